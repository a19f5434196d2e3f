//! The router's side of the gRPC contract: one connection to one executor, one long-lived
//! Generate stream multiplexing every request, and reconnection when the executor restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
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
}

enum Command {
    Submit(pb::GenerateRequest, mpsc::UnboundedSender<ExecutorEvent>),
    Cancel(u64),
}

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
}

/// Cancels the request in the executor when dropped before it finished
/// (client gone, stop sequence hit, handler aborted).
pub struct RequestGuard {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
    finished: bool,
}

impl RequestGuard {
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
        let handle = Self {
            commands: tx,
            next_id: Arc::new(AtomicU64::new(1)),
            connected: connected.clone(),
            socket: Arc::new(socket.clone()),
        };
        tokio::spawn(dispatch(socket, rx, connected));
        handle
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub async fn client(&self) -> Result<ExecutorClient<Channel>, tonic::transport::Error> {
        Ok(ExecutorClient::new(connect_channel(&self.socket).await?))
    }

    /// Sends a request; its outputs arrive on the returned receiver.
    pub fn submit(
        &self,
        mut request: pb::GenerateRequest,
    ) -> (RequestGuard, mpsc::UnboundedReceiver<ExecutorEvent>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        request.id = id;
        let (tx, rx) = mpsc::unbounded_channel();
        if let Err(mpsc::error::SendError(Command::Submit(_, tx))) =
            self.commands.send(Command::Submit(request, tx))
        {
            let _ = tx.send(ExecutorEvent::Disconnected(
                "router is shutting down".into(),
            ));
        }
        let guard = RequestGuard {
            id,
            commands: self.commands.clone(),
            finished: false,
        };
        (guard, rx)
    }
}

type Pending = HashMap<u64, mpsc::UnboundedSender<ExecutorEvent>>;

async fn dispatch(
    socket: PathBuf,
    mut commands: mpsc::UnboundedReceiver<Command>,
    connected: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(50);
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
                            Some(Command::Submit(_, tx)) => {
                                let _ = tx.send(ExecutorEvent::Disconnected(format!("executor unavailable: {e}")));
                            }
                            Some(Command::Cancel(_)) => {}
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
        backoff = Duration::from_millis(50);
        let mut pending: Pending = HashMap::new();

        let reason = loop {
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    let mut batch = pb::GenerateCommand::default();
                    apply(cmd, &mut pending, &mut batch);
                    // Coalesce everything already waiting into one message.
                    while let Ok(cmd) = commands.try_recv() {
                        apply(cmd, &mut pending, &mut batch);
                    }
                    if batch.requests.is_empty() && batch.cancel_ids.is_empty() {
                        continue;
                    }
                    if outbound.send(batch).await.is_err() {
                        break "executor stream closed".to_string();
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(iteration)) => route(iteration, &mut pending),
                    Ok(None) => break "executor closed the generate stream".to_string(),
                    Err(status) => break format!("executor stream failed: {}", status.message()),
                }
            }
        };
        connected.store(false, Ordering::Release);
        tracing::error!(%reason, in_flight = pending.len(), "lost the executor");
        for (_, tx) in pending.drain() {
            let _ = tx.send(ExecutorEvent::Disconnected(reason.clone()));
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

fn apply(cmd: Command, pending: &mut Pending, batch: &mut pb::GenerateCommand) {
    match cmd {
        Command::Submit(req, tx) => {
            if tx.is_closed() {
                return; // client left before the request was sent
            }
            pending.insert(req.id, tx);
            batch.requests.push(req);
        }
        Command::Cancel(id) => {
            if pending.remove(&id).is_some() {
                // Sent in the same message as any submit of it, after it.
                if let Some(pos) = batch.requests.iter().position(|r| r.id == id) {
                    batch.requests.swap_remove(pos);
                } else {
                    batch.cancel_ids.push(id);
                }
            }
        }
    }
}

fn route(iteration: pb::IterationOutput, pending: &mut Pending) {
    for output in iteration.outputs {
        let id = output.request_id;
        let done = output.finish_reason != pb::FinishReason::Unspecified as i32;
        // A closed receiver is left in place: its guard's Cancel follows and removes it.
        if let Some(tx) = pending.get(&id) {
            let _ = tx.send(ExecutorEvent::Output(output));
            if done {
                pending.remove(&id);
            }
        }
    }
}
