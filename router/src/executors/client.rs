//! The router's side of the gRPC contract: one connection to one executor, one long-lived
//! Generate stream multiplexing every request, and reconnection when the executor restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb;
use crate::pb::executor_client::ExecutorClient;

/// What a request's stream receives.
#[derive(Debug)]
pub enum ExecutorEvent {
    Output(pb::RequestOutput),
    /// The connection broke; the request is lost.
    Disconnected(String),
    /// Ended by rollout control (/abort_request, a pause or update that aborts); it has been
    /// cancelled in the executor.
    Aborted(String),
}

enum Command {
    Submit(Vec<(pb::GenerateRequest, mpsc::UnboundedSender<ExecutorEvent>)>),
    Cancel(u64),
    /// Ends every live request with this reason (and cancels it in the executor).
    FailAll(String),
    /// Ends these live requests (None: every one) as aborted, cancels them in the executor,
    /// and answers how many there were.
    Abort(Option<Vec<u64>>, String, oneshot::Sender<usize>),
    /// Answered once no request is live in the executor (at once if none is).
    WhenIdle(oneshot::Sender<()>),
    /// Answered with the number of requests live in the executor now.
    Live(oneshot::Sender<usize>),
}

pub type Submitted = (RequestGuard, mpsc::UnboundedReceiver<ExecutorEvent>);

pub async fn connect_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the unix socket.
    Endpoint::from_static("http://executor")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
}

/// Cheap to clone; shared by all handlers.
#[derive(Clone)]
pub struct ExecutorHandle {
    commands: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    socket: Arc<PathBuf>,
    /// Counts connections made: a new value means the executor may have restarted.
    connections: watch::Receiver<u64>,
}

/// Cancels the request in the executor when dropped before it finished
/// (client gone, stop sequence hit, handler aborted).
pub struct RequestGuard {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
    finished: bool,
}

impl RequestGuard {
    /// The request's id in the executor.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}

impl ExecutorHandle {
    /// Starts the dispatcher task. It connects (and reconnects) on its own.
    pub fn spawn(socket: PathBuf) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let (epoch_tx, epoch_rx) = watch::channel(0);
        let handle = Self {
            commands: tx,
            next_id: Arc::new(AtomicU64::new(1)),
            connected: connected.clone(),
            socket: Arc::new(socket.clone()),
            connections: epoch_rx,
        };
        tokio::spawn(dispatch(socket, rx, connected, epoch_tx));
        handle
    }

    /// Changes each time the dispatcher connects (the executor may have restarted since).
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connections.clone()
    }

    /// Ends these live requests (None: every one) as aborted with `reason`: each stream gets
    /// it as its last event, and the executor is told to cancel them. Returns how many were
    /// live; requests submitted before the call are counted.
    pub async fn abort(&self, ids: Option<Vec<u64>>, reason: String) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Abort(ids, reason, tx)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Requests live in the executor now; requests submitted before the call are counted.
    pub async fn live(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Live(tx)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Resolves once no request is live in the executor: each has finished, or been
    /// cancelled, aborted or lost. Requests submitted before the call are counted.
    pub async fn idle(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::WhenIdle(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub async fn client(&self) -> Result<ExecutorClient<Channel>, tonic::transport::Error> {
        Ok(ExecutorClient::new(connect_channel(&self.socket).await?))
    }

    /// A client for the rollout-control RPCs, whose messages may be as large as the control
    /// routes' bodies (--rl-max-payload-bytes): weight payloads. tonic's default limit (4 MiB
    /// decoding) stays on every other call.
    pub async fn control_client(
        &self,
        max_message_bytes: usize,
    ) -> Result<ExecutorClient<Channel>, tonic::transport::Error> {
        Ok(ExecutorClient::new(connect_channel(&self.socket).await?)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes))
    }

    /// Ends every request in flight with `reason` (the shutdown timeout ran out): each stream
    /// gets it as an error, and the executor is told to cancel them.
    pub fn fail_all(&self, reason: String) {
        let _ = self.commands.send(Command::FailAll(reason));
    }

    /// Sends a request; its outputs arrive on the returned receiver.
    pub fn submit(&self, request: pb::GenerateRequest) -> Submitted {
        let mut v = self.submit_batch(vec![request]);
        v.pop().expect("one request in, one handle out")
    }

    /// Sends requests together: they reach the executor in one message.
    pub fn submit_batch(&self, requests: Vec<pb::GenerateRequest>) -> Vec<Submitted> {
        let mut handles = Vec::with_capacity(requests.len());
        let mut batch = Vec::with_capacity(requests.len());
        for mut request in requests {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            request.id = id;
            let (tx, rx) = mpsc::unbounded_channel();
            batch.push((request, tx));
            let guard = RequestGuard {
                id,
                commands: self.commands.clone(),
                finished: false,
            };
            handles.push((guard, rx));
        }
        if let Err(mpsc::error::SendError(Command::Submit(batch))) =
            self.commands.send(Command::Submit(batch))
        {
            for (_, tx) in batch {
                let _ = tx.send(ExecutorEvent::Disconnected(
                    "router is shutting down".into(),
                ));
            }
        }
        handles
    }
}

type Pending = HashMap<u64, Route>;

/// Where one live request's outputs go.
struct Route {
    tx: mpsc::UnboundedSender<ExecutorEvent>,
    /// Some output has been delivered already (the request is past its first token).
    started: bool,
}

async fn dispatch(
    socket: PathBuf,
    mut commands: mpsc::UnboundedReceiver<Command>,
    connected: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut idle_waiters: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let stream = open_stream(&socket).await;
        let (outbound, mut inbound) = match stream {
            Ok(s) => s,
            Err(e) => {
                // While the executor is away, refuse work at once instead of queueing it blindly.
                let deadline = tokio::time::sleep(backoff);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        cmd = commands.recv() => match cmd {
                            Some(Command::Submit(batch)) => {
                                for (_, tx) in batch {
                                    let _ = tx.send(ExecutorEvent::Disconnected(format!("executor unavailable: {e}")));
                                }
                            }
                            // Nothing is live while disconnected.
                            Some(Command::WhenIdle(tx)) => {
                                let _ = tx.send(());
                            }
                            Some(Command::Live(tx)) => {
                                let _ = tx.send(0);
                            }
                            Some(Command::Abort(_, _, tx)) => {
                                let _ = tx.send(0);
                            }
                            Some(Command::Cancel(_) | Command::FailAll(_)) => {}
                            None => return,
                        }
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        tracing::info!(socket = %socket.display(), "connected to executor");
        connected.store(true, Ordering::Release);
        epoch.send_modify(|n| *n += 1);
        crate::metrics::set_executor_connected(true);
        backoff = Duration::from_millis(50);
        let mut pending: Pending = HashMap::new();

        let reason = loop {
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    let mut batch = pb::GenerateCommand::default();
                    apply(cmd, &mut pending, &mut batch, &mut idle_waiters);
                    // Coalesce everything already waiting into one message.
                    while let Ok(cmd) = commands.try_recv() {
                        apply(cmd, &mut pending, &mut batch, &mut idle_waiters);
                    }
                    notify_if_idle(&pending, &mut idle_waiters);
                    if batch.requests.is_empty() && batch.cancel_ids.is_empty() {
                        continue;
                    }
                    if outbound.send(batch).await.is_err() {
                        break "executor stream closed".to_string();
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(iteration)) => {
                        route(iteration, &mut pending);
                        notify_if_idle(&pending, &mut idle_waiters);
                    }
                    Ok(None) => break "executor closed the generate stream".to_string(),
                    Err(status) => break format!("executor stream failed: {}", status.message()),
                }
            }
        };
        connected.store(false, Ordering::Release);
        crate::metrics::set_executor_connected(false);
        tracing::error!(%reason, in_flight = pending.len(), "lost the executor");
        for (_, Route { tx, .. }) in pending.drain() {
            let _ = tx.send(ExecutorEvent::Disconnected(reason.clone()));
        }
        notify_if_idle(&pending, &mut idle_waiters);
    }
}

fn notify_if_idle(pending: &Pending, waiters: &mut Vec<oneshot::Sender<()>>) {
    if pending.is_empty() {
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

async fn open_stream(
    socket: &Path,
) -> Result<
    (
        mpsc::Sender<pb::GenerateCommand>,
        tonic::Streaming<pb::IterationOutput>,
    ),
    String,
> {
    let channel = connect_channel(socket).await.map_err(|e| e.to_string())?;
    let mut client = ExecutorClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(1024);
    let inbound = client
        .generate(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    Ok((tx, inbound))
}

fn apply(
    cmd: Command,
    pending: &mut Pending,
    batch: &mut pb::GenerateCommand,
    idle_waiters: &mut Vec<oneshot::Sender<()>>,
) {
    match cmd {
        Command::Submit(requests) => {
            for (req, tx) in requests {
                if tx.is_closed() {
                    continue; // client left before the request was sent
                }
                pending.insert(req.id, Route { tx, started: false });
                batch.requests.push(req);
            }
        }
        Command::FailAll(reason) => {
            for (id, route) in pending.drain() {
                let _ = route.tx.send(ExecutorEvent::Disconnected(reason.clone()));
                batch.requests.retain(|r| r.id != id);
                batch.cancel_ids.push(id);
            }
        }
        Command::Cancel(id) => {
            if pending.remove(&id).is_some() {
                unsend_or_cancel(id, batch);
            }
        }
        Command::Abort(ids, reason, reply) => {
            let ids: Vec<u64> = ids.unwrap_or_else(|| pending.keys().copied().collect());
            let mut n = 0;
            for id in ids {
                if let Some(route) = pending.remove(&id) {
                    let _ = route.tx.send(ExecutorEvent::Aborted(reason.clone()));
                    unsend_or_cancel(id, batch);
                    n += 1;
                }
            }
            let _ = reply.send(n);
        }
        Command::WhenIdle(tx) => idle_waiters.push(tx),
        Command::Live(tx) => {
            let _ = tx.send(pending.len());
        }
    }
}

/// Takes a request out of the message being built if it is there (its submit and its cancel
/// would travel together), or cancels it in the executor.
fn unsend_or_cancel(id: u64, batch: &mut pb::GenerateCommand) {
    if let Some(pos) = batch.requests.iter().position(|r| r.id == id) {
        batch.requests.swap_remove(pos);
    } else {
        batch.cancel_ids.push(id);
    }
}

fn route(iteration: pb::IterationOutput, pending: &mut Pending) {
    for output in first_outputs_first(iteration.outputs, pending) {
        let id = output.request_id;
        let done = output.finish_reason != pb::FinishReason::Unspecified as i32;
        // A closed receiver is left in place: its guard's Cancel follows and removes it.
        if let Some(route) = pending.get_mut(&id) {
            route.started = true;
            let _ = route.tx.send(ExecutorEvent::Output(output));
            if done {
                pending.remove(&id);
            }
        }
    }
}

/// An iteration's outputs with those of requests that have had none yet moved to the front.
/// The streams they wake run roughly in wake order, and with hundreds of streams that fan-out
/// takes milliseconds: a new request's first token (its TTFT) goes ahead, while a running
/// stream only trades places with others from one token to the next. Order within each group
/// is kept.
fn first_outputs_first(
    outputs: Vec<pb::RequestOutput>,
    pending: &Pending,
) -> Vec<pb::RequestOutput> {
    let is_first = |o: &pb::RequestOutput| pending.get(&o.request_id).is_some_and(|r| !r.started);
    // Most steps start no request: hand the message's list back untouched, no allocation.
    if !outputs.iter().any(is_first) {
        return outputs;
    }
    let (mut ordered, rest): (Vec<_>, Vec<_>) = outputs.into_iter().partition(is_first);
    ordered.extend(rest);
    ordered
}

#[cfg(test)]
mod tests {
    //! The dispatcher against a fake executor served by tonic on a real unix socket.

    use super::*;
    use crate::pb::executor_server::{Executor, ExecutorServer};
    use std::pin::Pin;
    use tokio::net::UnixListener;
    use tokio_stream::wrappers::UnixListenerStream;
    use tokio_stream::Stream;
    use tonic::{Request, Response, Status, Streaming};

    /// Answers each request with `tokens` one-token outputs, records cancels, and can be told
    /// to drop every stream (an executor crash as the router sees it).
    #[derive(Clone)]
    struct FakeExecutor {
        tokens: u32,
        cancels: mpsc::UnboundedSender<u64>,
        hang_up: Arc<tokio::sync::Notify>,
    }

    type OutStream = Pin<Box<dyn Stream<Item = Result<pb::IterationOutput, Status>> + Send>>;

    #[tonic::async_trait]
    impl Executor for FakeExecutor {
        async fn info(
            &self,
            _: Request<pb::InfoRequest>,
        ) -> Result<Response<pb::InfoResponse>, Status> {
            Ok(Response::new(pb::InfoResponse::default()))
        }
        async fn health(
            &self,
            _: Request<pb::HealthRequest>,
        ) -> Result<Response<pb::HealthResponse>, Status> {
            Ok(Response::new(pb::HealthResponse {
                ready: true,
                reason: String::new(),
            }))
        }
        async fn stats(
            &self,
            _: Request<pb::StatsRequest>,
        ) -> Result<Response<pb::StatsResponse>, Status> {
            Ok(Response::new(pb::StatsResponse::default()))
        }
        type KvCacheEventsStream =
            Pin<Box<dyn Stream<Item = Result<pb::KvCacheEventBatch, Status>> + Send>>;
        async fn kv_cache_events(
            &self,
            _: Request<pb::KvCacheEventsRequest>,
        ) -> Result<Response<Self::KvCacheEventsStream>, Status> {
            Err(Status::unimplemented(
                "the fake publishes no KV-cache events",
            ))
        }
        async fn release_memory(
            &self,
            _: Request<pb::MemoryRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::unimplemented("the fake has no rollout control"))
        }
        async fn resume_memory(
            &self,
            _: Request<pb::MemoryRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::unimplemented("the fake has no rollout control"))
        }
        async fn update_weights(
            &self,
            _: Request<pb::UpdateWeightsRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::unimplemented("the fake has no rollout control"))
        }
        async fn flush_cache(
            &self,
            _: Request<pb::FlushCacheRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::unimplemented("the fake has no rollout control"))
        }
        async fn pause_generation(
            &self,
            _: Request<pb::PauseGenerationRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::unimplemented("the fake has no rollout control"))
        }
        async fn continue_generation(
            &self,
            _: Request<pb::ContinueGenerationRequest>,
        ) -> Result<Response<pb::ControlResponse>, Status> {
            Err(Status::unimplemented("the fake has no rollout control"))
        }
        type GenerateStream = OutStream;
        async fn generate(
            &self,
            request: Request<Streaming<pb::GenerateCommand>>,
        ) -> Result<Response<OutStream>, Status> {
            let mut commands = request.into_inner();
            let me = self.clone();
            let out = async_stream::stream! {
                loop {
                    tokio::select! {
                        _ = me.hang_up.notified() => break,
                        cmd = commands.message() => {
                            let Ok(Some(cmd)) = cmd else { break };
                            for id in cmd.cancel_ids {
                                let _ = me.cancels.send(id);
                            }
                            for r in cmd.requests {
                                for i in 0..me.tokens {
                                    let last = i + 1 == me.tokens;
                                    yield Ok(pb::IterationOutput {
                                        iteration: u64::from(i),
                                        outputs: vec![pb::RequestOutput {
                                            request_id: r.id,
                                            token_ids: vec![100 + i],
                                            finish_reason: if last { pb::FinishReason::Length as i32 } else { 0 },
                                            ..Default::default()
                                        }],
                                    });
                                }
                            }
                        }
                    }
                }
            };
            Ok(Response::new(Box::pin(out)))
        }
    }

    async fn start_fake(
        tokens: u32,
    ) -> (
        tempdir::Dir,
        mpsc::UnboundedReceiver<u64>,
        Arc<tokio::sync::Notify>,
    ) {
        let dir = tempdir::Dir::new();
        let socket = dir.path.join("fake.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (tx, rx) = mpsc::unbounded_channel();
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let fake = FakeExecutor {
            tokens,
            cancels: tx,
            hang_up: hang_up.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExecutorServer::new(fake))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        (dir, rx, hang_up)
    }

    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!(
                    "tg-test-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&path).expect("mkdir");
                Self { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    async fn connected(handle: &ExecutorHandle) {
        for _ in 0..200 {
            if handle.is_connected() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("dispatcher never connected");
    }

    #[test]
    fn first_tokens_are_routed_before_running_streams() {
        let mut pending = Pending::new();
        let mut keep = Vec::new();
        for (id, started) in [(1, true), (2, false), (3, true), (4, false)] {
            let (tx, rx) = mpsc::unbounded_channel();
            keep.push(rx);
            pending.insert(id, Route { tx, started });
        }
        let outputs = [3, 4, 1, 9, 2]
            .into_iter()
            .map(|request_id| pb::RequestOutput {
                request_id,
                ..Default::default()
            })
            .collect();
        let order: Vec<u64> = first_outputs_first(outputs, &pending)
            .iter()
            .map(|o| o.request_id)
            .collect();
        // New requests first (in message order), then the rest (unknown id 9 included).
        assert_eq!(order, vec![4, 2, 3, 1, 9]);

        let mut iteration = pb::IterationOutput::default();
        iteration.outputs.push(pb::RequestOutput {
            request_id: 2,
            token_ids: vec![5],
            ..Default::default()
        });
        route(iteration, &mut pending);
        assert!(
            pending[&2].started,
            "a delivered output marks its request started"
        );
        assert!(matches!(keep[1].try_recv(), Ok(ExecutorEvent::Output(o)) if o.token_ids == [5]));
    }

    #[tokio::test]
    async fn outputs_reach_their_request() {
        let (dir, _cancels, _hang) = start_fake(3).await;
        let handle = ExecutorHandle::spawn(dir.path.join("fake.sock"));
        connected(&handle).await;
        let (mut guard, mut rx) = handle.submit(pb::GenerateRequest::default());
        let mut tokens = vec![];
        while let Some(ExecutorEvent::Output(o)) = rx.recv().await {
            tokens.extend(o.token_ids);
            if o.finish_reason != 0 {
                break;
            }
        }
        guard.finish();
        assert_eq!(tokens, vec![100, 101, 102]);
    }

    #[tokio::test]
    async fn dropping_the_guard_cancels_in_the_executor() {
        let (dir, mut cancels, _hang) = start_fake(0).await;
        let handle = ExecutorHandle::spawn(dir.path.join("fake.sock"));
        connected(&handle).await;
        let (guard, _rx) = handle.submit(pb::GenerateRequest::default());
        // Let the submit reach the executor before the client goes away.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(guard);
        let id = tokio::time::timeout(Duration::from_secs(5), cancels.recv())
            .await
            .expect("cancel arrives")
            .expect("channel open");
        assert_eq!(id, 1);
    }

    #[tokio::test]
    async fn a_lost_executor_ends_every_request_with_an_error_and_reconnects() {
        let (dir, _cancels, hang_up) = start_fake(0).await;
        let handle = ExecutorHandle::spawn(dir.path.join("fake.sock"));
        connected(&handle).await;
        let (_g1, mut rx1) = handle.submit(pb::GenerateRequest::default());
        let (_g2, mut rx2) = handle.submit(pb::GenerateRequest::default());
        tokio::time::sleep(Duration::from_millis(50)).await;
        hang_up.notify_waiters();
        for rx in [&mut rx1, &mut rx2] {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event, not a hang");
            assert!(matches!(ev, Some(ExecutorEvent::Disconnected(_))), "{ev:?}");
        }
        // The dispatcher opens a new stream: service resumes.
        connected(&handle).await;
    }

    #[tokio::test]
    async fn fail_all_ends_every_request_with_the_reason_and_cancels_it() {
        let (dir, mut cancels, _hang) = start_fake(0).await;
        let handle = ExecutorHandle::spawn(dir.path.join("fake.sock"));
        connected(&handle).await;
        let (_g1, mut rx1) = handle.submit(pb::GenerateRequest::default());
        let (_g2, mut rx2) = handle.submit(pb::GenerateRequest::default());
        tokio::time::sleep(Duration::from_millis(50)).await;
        handle.fail_all("shutting down".into());
        for rx in [&mut rx1, &mut rx2] {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event, not a hang");
            assert!(
                matches!(ev, Some(ExecutorEvent::Disconnected(ref r)) if r == "shutting down"),
                "{ev:?}"
            );
        }
        let mut cancelled = vec![];
        for _ in 0..2 {
            let id = tokio::time::timeout(Duration::from_secs(5), cancels.recv())
                .await
                .expect("cancel arrives")
                .expect("channel open");
            cancelled.push(id);
        }
        cancelled.sort();
        assert_eq!(cancelled, vec![1, 2]);
    }
}
