//! The router's side of the gRPC contract with one executor (one worker of the pool): one
//! long-lived Generate stream multiplexing every request sent to it, reconnection when the
//! executor restarts, and the hand-back of requests its loss orphans (for migration).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::executors::endpoint::{self, Client, Credentials, Target};
use crate::executors::routing::WorkerId;
use crate::pb;

/// What a request's stream receives.
#[derive(Debug)]
pub enum ExecutorEvent {
    Output(pb::RequestOutput),
    /// The connection broke (and the request could not move to another worker); it is lost.
    Disconnected(String),
    /// Ended by rollout control (/abort_request, a pause or update that aborts); it has been
    /// cancelled in the executor.
    Aborted(String),
}

pub(crate) enum Command {
    Submit(Vec<Submission>),
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

/// Where a request's cancel goes: the connection of the worker it runs on now (a migration
/// points it at the next one).
pub struct CancelTarget(Mutex<mpsc::UnboundedSender<Command>>);

impl CancelTarget {
    pub(crate) fn new(commands: mpsc::UnboundedSender<Command>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(commands)))
    }

    fn send(&self, command: Command) {
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send(command);
        }
    }

    pub(crate) fn retarget(&self, commands: mpsc::UnboundedSender<Command>) {
        if let Ok(mut tx) = self.0.lock() {
            *tx = commands;
        }
    }
}

/// Cancels the request in the executor when dropped before it finished
/// (client gone, stop sequence hit, handler aborted).
pub struct RequestGuard {
    id: u64,
    target: Arc<CancelTarget>,
    finished: bool,
}

impl RequestGuard {
    pub(crate) fn new(id: u64, target: Arc<CancelTarget>) -> Self {
        Self {
            id,
            target,
            finished: false,
        }
    }

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
            self.target.send(Command::Cancel(self.id));
        }
    }
}

pub type Submitted = (RequestGuard, mpsc::UnboundedReceiver<ExecutorEvent>);

/// What a request needs to continue on another worker: the request as first sent and the
/// tokens generated for it so far (on every worker it ran on).
#[derive(Debug)]
pub struct Resume {
    pub original: pb::GenerateRequest,
    pub generated: Vec<u32>,
    pub migrations: u32,
}

/// One request handed to a connection.
pub struct Submission {
    pub request: pb::GenerateRequest,
    pub tx: mpsc::UnboundedSender<ExecutorEvent>,
    pub target: Arc<CancelTarget>,
    /// Its prompt tokens the worker has to prefill (those its cache is not expected to hold),
    /// as the pool charged them to the worker's load (released when it leaves).
    pub charge: u64,
    /// Some output has been delivered already (a migrated request).
    pub started: bool,
    /// Kept when migration is on.
    pub resume: Option<Box<Resume>>,
}

/// A request whose worker was lost before it finished: the pool moves it or ends it.
pub struct Orphan {
    pub id: u64,
    pub from: WorkerId,
    pub reason: String,
    pub tx: mpsc::UnboundedSender<ExecutorEvent>,
    pub target: Arc<CancelTarget>,
    pub started: bool,
    pub resume: Option<Box<Resume>>,
}

/// What the pool's routing reads of a worker, kept by the pool (on send) and the connection
/// (on first output and finish) without a round trip.
#[derive(Debug, Default)]
pub struct Load {
    /// Requests sent and not finished.
    pub in_flight: AtomicU32,
    /// Prompt tokens of the requests waiting for their first token (prefill ahead).
    pub waiting_tokens: AtomicU64,
    /// Requests past their first token (decoding: one token each per step).
    pub running: AtomicU32,
    /// Prompt tokens sent, and those the executor took from its prefix cache
    /// (`RequestOutput.cached_tokens`): the worker's prefix hit rate.
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Requests routed to the worker.
    pub requests: AtomicU64,
}

impl Load {
    /// A request of `prompt` tokens, `prefill` of them to compute, sent to the worker
    /// (`started`: a migrated one that has produced tokens already).
    pub fn charge(&self, prefill: u64, prompt: u64, started: bool) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if started {
            self.running.fetch_add(1, Ordering::Relaxed);
        } else {
            self.waiting_tokens.fetch_add(prefill, Ordering::Relaxed);
            self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn start(&self, prompt: u64) {
        self.waiting_tokens.fetch_sub(prompt, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self, prompt: u64, started: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if started {
            self.running.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.waiting_tokens.fetch_sub(prompt, Ordering::Relaxed);
        }
    }
}

/// Cheap to clone: the pool's handle to one worker's dispatcher task.
#[derive(Clone)]
pub struct Connection {
    commands: mpsc::UnboundedSender<Command>,
    connected: Arc<AtomicBool>,
    target: Arc<Target>,
    credentials: Credentials,
    /// Counts connections made: a new value means the executor may have restarted.
    connections: watch::Receiver<u64>,
    load: Arc<Load>,
}

impl Connection {
    /// Starts the dispatcher task of worker `id`. It connects (and reconnects) on its own;
    /// requests its loss orphans go to `orphans` (None: they end with an error).
    pub fn spawn(
        id: WorkerId,
        target: Target,
        credentials: Credentials,
        orphans: Option<mpsc::UnboundedSender<Orphan>>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let (epoch_tx, epoch_rx) = watch::channel(0);
        let load = Arc::new(Load::default());
        let handle = Self {
            commands: tx,
            connected: connected.clone(),
            target: Arc::new(target.clone()),
            credentials: credentials.clone(),
            connections: epoch_rx,
            load: load.clone(),
        };
        let dispatcher = Dispatcher {
            id,
            target,
            credentials,
            connected,
            epoch: epoch_tx,
            load,
            orphans,
        };
        tokio::spawn(dispatcher.run(rx));
        handle
    }

    pub fn load(&self) -> &Arc<Load> {
        &self.load
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub(crate) fn commands(&self) -> mpsc::UnboundedSender<Command> {
        self.commands.clone()
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

    pub async fn client(&self) -> Result<Client, tonic::transport::Error> {
        endpoint::connect(&self.target, &self.credentials).await
    }

    /// A client for the rollout-control RPCs, whose messages may be as large as the control
    /// routes' bodies (--rl-max-payload-bytes): weight payloads. tonic's default limit (4 MiB
    /// decoding) stays on every other call.
    pub async fn control_client(
        &self,
        max_message_bytes: usize,
    ) -> Result<Client, tonic::transport::Error> {
        Ok(self
            .client()
            .await?
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes))
    }

    /// Ends every request in flight with `reason` (the shutdown timeout ran out): each stream
    /// gets it as an error, and the executor is told to cancel them.
    pub fn fail_all(&self, reason: String) {
        let _ = self.commands.send(Command::FailAll(reason));
    }

    /// Sends requests together: they reach the executor in one message.
    pub fn submit(&self, batch: Vec<Submission>) {
        if let Err(mpsc::error::SendError(Command::Submit(batch))) =
            self.commands.send(Command::Submit(batch))
        {
            for s in batch {
                self.load.release(s.charge, s.started);
                let _ = s.tx.send(ExecutorEvent::Disconnected(
                    "router is shutting down".into(),
                ));
            }
        }
    }
}

type Pending = HashMap<u64, Route>;

/// Where one live request's outputs go.
struct Route {
    tx: mpsc::UnboundedSender<ExecutorEvent>,
    /// Some output has been delivered already (the request is past its first token).
    started: bool,
    target: Arc<CancelTarget>,
    charge: u64,
    resume: Option<Box<Resume>>,
}

struct Dispatcher {
    id: WorkerId,
    target: Target,
    credentials: Credentials,
    connected: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
    load: Arc<Load>,
    orphans: Option<mpsc::UnboundedSender<Orphan>>,
}

impl Dispatcher {
    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let worker = self.target.to_string();
        let mut backoff = Duration::from_millis(50);
        let mut idle_waiters: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let stream = open_stream(&self.target, &self.credentials).await;
            let (outbound, mut inbound) = match stream {
                Ok(s) => s,
                Err(e) => {
                    // While the executor is away, refuse work at once instead of queueing it
                    // blindly (the pool routes none here while it is disconnected).
                    let deadline = tokio::time::sleep(backoff);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            cmd = commands.recv() => match cmd {
                                Some(Command::Submit(batch)) => {
                                    for s in batch {
                                        self.orphan(s.request.id, route_of(s), format!("executor unavailable: {e}"));
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
            tracing::info!(%worker, "connected to executor");
            self.connected.store(true, Ordering::Release);
            self.epoch.send_modify(|n| *n += 1);
            crate::metrics::set_executor_connected(&worker, true);
            backoff = Duration::from_millis(50);
            let mut pending: Pending = HashMap::new();

            let reason = loop {
                tokio::select! {
                    cmd = commands.recv() => {
                        let Some(cmd) = cmd else { return };
                        let mut batch = pb::GenerateCommand::default();
                        self.apply(cmd, &mut pending, &mut batch, &mut idle_waiters);
                        // Coalesce everything already waiting into one message.
                        while let Ok(cmd) = commands.try_recv() {
                            self.apply(cmd, &mut pending, &mut batch, &mut idle_waiters);
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
                            self.route(iteration, &mut pending);
                            notify_if_idle(&pending, &mut idle_waiters);
                        }
                        Ok(None) => break "executor closed the generate stream".to_string(),
                        Err(status) => break format!("executor stream failed: {}", status.message()),
                    }
                }
            };
            self.connected.store(false, Ordering::Release);
            crate::metrics::set_executor_connected(&worker, false);
            tracing::error!(%worker, %reason, in_flight = pending.len(), "lost the executor");
            for (id, route) in pending.drain() {
                self.orphan(id, route, reason.clone());
            }
            notify_if_idle(&pending, &mut idle_waiters);
        }
    }

    /// A request that left this worker unfinished: to the pool (to move it), or ended.
    fn orphan(&self, id: u64, route: Route, reason: String) {
        self.load.release(route.charge, route.started);
        if route.tx.is_closed() {
            return; // its client is gone: nothing to continue
        }
        let orphan = Orphan {
            id,
            from: self.id,
            reason,
            tx: route.tx,
            target: route.target,
            started: route.started,
            resume: route.resume,
        };
        if let Some(orphans) = &self.orphans {
            if let Err(mpsc::error::SendError(orphan)) = orphans.send(orphan) {
                let _ = orphan.tx.send(ExecutorEvent::Disconnected(orphan.reason));
            }
        } else {
            let _ = orphan.tx.send(ExecutorEvent::Disconnected(orphan.reason));
        }
    }

    fn leave(&self, route: &Route) {
        self.load.release(route.charge, route.started);
    }

    fn apply(
        &self,
        cmd: Command,
        pending: &mut Pending,
        batch: &mut pb::GenerateCommand,
        idle_waiters: &mut Vec<oneshot::Sender<()>>,
    ) {
        match cmd {
            Command::Submit(requests) => {
                for s in requests {
                    if s.tx.is_closed() {
                        self.load.release(s.charge, s.started);
                        continue; // client left before the request was sent
                    }
                    let id = s.request.id;
                    let request = {
                        let mut s = s;
                        let request = std::mem::take(&mut s.request);
                        pending.insert(id, route_of(s));
                        request
                    };
                    batch.requests.push(request);
                }
            }
            Command::FailAll(reason) => {
                for (id, route) in pending.drain() {
                    self.leave(&route);
                    let _ = route.tx.send(ExecutorEvent::Disconnected(reason.clone()));
                    batch.requests.retain(|r| r.id != id);
                    batch.cancel_ids.push(id);
                }
            }
            Command::Cancel(id) => {
                if let Some(route) = pending.remove(&id) {
                    self.leave(&route);
                    unsend_or_cancel(id, batch);
                }
            }
            Command::Abort(ids, reason, reply) => {
                let ids: Vec<u64> = ids.unwrap_or_else(|| pending.keys().copied().collect());
                let mut n = 0;
                for id in ids {
                    if let Some(route) = pending.remove(&id) {
                        self.leave(&route);
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

    fn route(&self, iteration: pb::IterationOutput, pending: &mut Pending) {
        for output in first_outputs_first(iteration.outputs, pending) {
            let id = output.request_id;
            let done = output.finish_reason != pb::FinishReason::Unspecified as i32;
            // A closed receiver is left in place: its guard's Cancel follows and removes it.
            if let Some(route) = pending.get_mut(&id) {
                if !route.started {
                    self.load.start(route.charge);
                    self.load
                        .cached_tokens
                        .fetch_add(u64::from(output.cached_tokens), Ordering::Relaxed);
                    route.started = true;
                }
                if let Some(resume) = route.resume.as_mut() {
                    resume.generated.extend_from_slice(&output.token_ids);
                }
                let _ = route.tx.send(ExecutorEvent::Output(output));
                if done {
                    if let Some(route) = pending.remove(&id) {
                        self.leave(&route);
                    }
                }
            }
        }
    }
}

fn route_of(s: Submission) -> Route {
    Route {
        tx: s.tx,
        started: s.started,
        target: s.target,
        charge: s.charge,
        resume: s.resume,
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
    target: &Target,
    credentials: &Credentials,
) -> Result<
    (
        mpsc::Sender<pb::GenerateCommand>,
        tonic::Streaming<pb::IterationOutput>,
    ),
    String,
> {
    let mut client = endpoint::connect(target, credentials)
        .await
        .map_err(|e| e.to_string())?
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

/// Takes a request out of the message being built if it is there (its submit and its cancel
/// would travel together), or cancels it in the executor.
fn unsend_or_cancel(id: u64, batch: &mut pb::GenerateCommand) {
    if let Some(pos) = batch.requests.iter().position(|r| r.id == id) {
        batch.requests.swap_remove(pos);
    } else {
        batch.cancel_ids.push(id);
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
    use crate::executors::pool::ExecutorHandle;
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

    fn dispatcher() -> Dispatcher {
        Dispatcher {
            id: WorkerId(0),
            target: Target::Unix("/nonexistent".into()),
            credentials: Credentials::default(),
            connected: Arc::default(),
            epoch: watch::channel(0).0,
            load: Arc::default(),
            orphans: None,
        }
    }

    #[test]
    fn first_tokens_are_routed_before_running_streams() {
        let d = dispatcher();
        let mut pending = Pending::new();
        let mut keep = Vec::new();
        let (commands, _) = mpsc::unbounded_channel();
        for (id, started) in [(1, true), (2, false), (3, true), (4, false)] {
            let (tx, rx) = mpsc::unbounded_channel();
            keep.push(rx);
            let route = Route {
                tx,
                started,
                target: CancelTarget::new(commands.clone()),
                charge: 10,
                resume: (id == 2).then(|| {
                    Box::new(Resume {
                        original: pb::GenerateRequest::default(),
                        generated: vec![],
                        migrations: 0,
                    })
                }),
            };
            d.load.charge(10, 12, started);
            pending.insert(id, route);
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
            cached_tokens: 16,
            ..Default::default()
        });
        d.route(iteration, &mut pending);
        assert!(
            pending[&2].started,
            "a delivered output marks its request started"
        );
        assert!(matches!(keep[1].try_recv(), Ok(ExecutorEvent::Output(o)) if o.token_ids == [5]));
        // Kept for migration: the tokens generated so far; the hit counted once.
        assert_eq!(pending[&2].resume.as_ref().unwrap().generated, vec![5]);
        assert_eq!(d.load.cached_tokens.load(Ordering::Relaxed), 16);
        // A finished request leaves the worker's load.
        let mut last = pb::IterationOutput::default();
        last.outputs.push(pb::RequestOutput {
            request_id: 2,
            token_ids: vec![6],
            cached_tokens: 16,
            finish_reason: pb::FinishReason::Length as i32,
            ..Default::default()
        });
        d.route(last, &mut pending);
        assert!(!pending.contains_key(&2));
        assert_eq!(d.load.in_flight.load(Ordering::Relaxed), 3);
        // 1 and 3 decode, 4 waits for its first token with its 10 prompt tokens.
        assert_eq!(d.load.running.load(Ordering::Relaxed), 2);
        assert_eq!(d.load.waiting_tokens.load(Ordering::Relaxed), 10);
        assert_eq!(d.load.cached_tokens.load(Ordering::Relaxed), 16);
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
        let request = || pb::GenerateRequest {
            max_new_tokens: 8,
            ..Default::default()
        };
        let (_g1, mut rx1) = handle.submit(request());
        let (_g2, mut rx2) = handle.submit(request());
        tokio::time::sleep(Duration::from_millis(50)).await;
        hang_up.notify_waiters();
        for rx in [&mut rx1, &mut rx2] {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event, not a hang");
            // Migration is on, but the pool has no other worker to move them to.
            assert!(
                matches!(ev, Some(ExecutorEvent::Disconnected(ref why)) if why.contains("no other executor")),
                "{ev:?}"
            );
        }
        // The dispatcher opens a new stream: service resumes.
        connected(&handle).await;
    }

    #[tokio::test]
    async fn a_request_on_a_lost_worker_moves_to_another_and_completes() {
        use crate::executors::pool::PoolConfig;
        use crate::executors::routing::policy::RoutingKind;
        // Worker 0 never answers and then hangs up; worker 1 answers with three tokens.
        let (silent, _c0, hang_up) = start_fake(0).await;
        let (answering, _c1, _h1) = start_fake(3).await;
        let handle = ExecutorHandle::start(PoolConfig {
            addresses: vec![
                crate::executors::endpoint::ExecutorAddress::Unix(silent.path.join("fake.sock")),
                crate::executors::endpoint::ExecutorAddress::Unix(answering.path.join("fake.sock")),
            ],
            routing: RoutingKind::RoundRobin,
            ..PoolConfig::unix("/unused".into())
        })
        .expect("pool");
        for _ in 0..200 {
            if handle
                .status()
                .iter()
                .all(|w| w.state == crate::executors::pool::WorkerState::Healthy)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (mut guard, mut rx) = handle.submit(pb::GenerateRequest {
            input_ids: vec![1, 2],
            max_new_tokens: 8,
            ..Default::default()
        });
        let first = handle.status();
        assert_eq!(
            (first[0].in_flight, first[1].in_flight),
            (1, 0),
            "{first:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        hang_up.notify_waiters();
        let mut tokens = vec![];
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event, not a hang");
            match ev {
                Some(ExecutorEvent::Output(o)) => {
                    tokens.extend(o.token_ids);
                    if o.finish_reason != 0 {
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        guard.finish();
        assert_eq!(tokens, vec![100, 101, 102]);
        let after = handle.status();
        assert_eq!(after[1].requests, 1, "{after:?}");
        assert_eq!(
            after.iter().map(|w| w.in_flight).sum::<u32>(),
            0,
            "{after:?}"
        );
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
