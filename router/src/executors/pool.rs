//! The pool of executors the router drives: its workers (one per unix socket, one per address
//! an https name resolves to), their health and load, the routing policy that picks one per
//! request, and migration of the requests a lost worker leaves unfinished.
//!
//! `ExecutorHandle` is what the rest of the router holds: it sends requests (routed), and fans
//! the pool-wide operations (abort, idle, fail) out to every worker.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::executors::client::{
    CancelTarget, Connection, ExecutorEvent, Orphan, RequestGuard, Resume, Submission, Submitted,
};
use crate::executors::discovery::{self, Membership};
use crate::executors::endpoint::{Client, Credentials, ExecutorAddress, Target};
use crate::executors::migration::{self, Unmovable};
use crate::executors::routing::kv_index::EventOutcome;
use crate::executors::routing::policy::{
    build_policy, InvalidLoadWeight, Prompt, RoutingKind, RoutingPolicy, SharedKvIndex, WorkerView,
};
use crate::executors::routing::WorkerId;
use crate::metrics as m;
use crate::pb;

/// `--executor`, `--routing` and their companions.
#[derive(Clone)]
pub struct PoolConfig {
    pub addresses: Vec<ExecutorAddress>,
    pub credentials: Credentials,
    pub routing: RoutingKind,
    pub load_weight: f64,
    pub migration_limit: u32,
    /// How often https names are resolved again.
    pub discovery_interval: Duration,
    /// How often each worker's Health and Stats are read.
    pub health_interval: Duration,
}

impl PoolConfig {
    /// One executor on a unix socket, routing and migration at their defaults.
    pub fn unix(socket: std::path::PathBuf) -> Self {
        Self {
            addresses: vec![ExecutorAddress::Unix(socket)],
            credentials: Credentials::default(),
            routing: RoutingKind::default(),
            load_weight: 1.0,
            migration_limit: 3,
            discovery_interval: Duration::from_secs(10),
            health_interval: Duration::from_secs(1),
        }
    }
}

/// A worker's state as `/info` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Connected and passing health checks: requests are routed to it.
    Healthy,
    /// Connected but failing health checks (or not checked yet): taken out of routing.
    Unhealthy,
    /// Not connected (starting, restarting or gone): taken out of routing.
    Disconnected,
    /// Its address left discovery: no new requests; it leaves once idle.
    Draining,
    /// It serves another model or vocabulary than the pool (its `Info`): never routed to.
    Incompatible,
}

/// One worker of `/info`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct WorkerStatus {
    pub id: u32,
    /// Where it is reached (`unix://…`, `https://name@ip:port`).
    pub address: String,
    pub state: WorkerState,
    /// Requests sent to it and not finished.
    pub in_flight: u32,
    /// Requests routed to it since it joined.
    pub requests: u64,
    /// Prompt tokens sent to it, and those its prefix cache served (`cached_tokens`).
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Its KV-cache block size (`Stats.kv_block_size`; 0: no prefix reuse).
    pub kv_block_size: u32,
    /// Blocks the router's KV index holds for it.
    pub indexed_blocks: usize,
}

/// What the monitor learns of a worker.
struct Health {
    healthy: AtomicBool,
    block_size: AtomicU32,
    draining: AtomicBool,
    incompatible: AtomicBool,
}

impl Default for Health {
    /// A worker is routable as soon as it connects (its Generate stream opens only once the
    /// executor serves); a failed check takes it out.
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            block_size: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            incompatible: AtomicBool::new(false),
        }
    }
}

struct Worker {
    id: WorkerId,
    /// The `--executor` it came from.
    source: ExecutorAddress,
    conn: Connection,
    health: Arc<Health>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Inner {
    workers: RwLock<Vec<Arc<Worker>>>,
    policy: Box<dyn RoutingPolicy>,
    index: SharedKvIndex,
    next_request: AtomicU64,
    next_worker: AtomicU32,
    migration_limit: u32,
    orphans: mpsc::UnboundedSender<Orphan>,
    credentials: Credentials,
    health_interval: Duration,
    subscribe_kv_events: bool,
    /// Bumped when any worker connects (one may have restarted) or joins or leaves.
    epoch: watch::Sender<u64>,
    /// Healthy workers now.
    healthy: watch::Sender<usize>,
    /// Some --executor is a DNS name: workers may join at any time.
    discovers: bool,
    /// What every worker must serve: the first `Info` the router started with.
    reference: std::sync::OnceLock<Reference>,
}

/// The parts of `Info` a request depends on: the same on every worker, or tokens mean
/// different things from one worker to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    model_id: String,
    vocab_size: u32,
    eos_token_ids: Vec<u32>,
}

impl Reference {
    fn of(info: &pb::InfoResponse) -> Self {
        Self {
            model_id: info.model_id.clone(),
            vocab_size: info.vocab_size,
            eos_token_ids: info.eos_token_ids.clone(),
        }
    }
}

/// Cheap to clone; shared by all handlers.
#[derive(Clone)]
pub struct ExecutorHandle {
    inner: Arc<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("--executor is required (unix:///path or https://host:port, repeatable)")]
    NoExecutor,
    #[error(transparent)]
    Credentials(#[from] crate::executors::endpoint::CredentialsError),
    #[error("--routing-load-weight: {0}")]
    LoadWeight(#[from] InvalidLoadWeight),
}

impl ExecutorHandle {
    /// One executor on a unix socket (tests, and the single-executor launcher).
    pub fn spawn(socket: std::path::PathBuf) -> Self {
        Self::start(PoolConfig::unix(socket)).expect("a unix executor needs no credentials")
    }

    /// Starts the pool: a connection per known worker, discovery of https names, the health
    /// monitors and the migration task.
    pub fn start(config: PoolConfig) -> Result<Self, PoolError> {
        if config.addresses.is_empty() {
            return Err(PoolError::NoExecutor);
        }
        for a in &config.addresses {
            config.credentials.check(a)?;
        }
        let index = SharedKvIndex::default();
        let policy = build_policy(config.routing, index.clone(), config.load_weight)?;
        let (orphans, orphan_rx) = mpsc::unbounded_channel();
        let discovers = config.addresses.iter().any(|a| {
            matches!(a, ExecutorAddress::Https { host, .. } if host.parse::<std::net::IpAddr>().is_err())
        });
        let inner = Arc::new(Inner {
            workers: RwLock::new(Vec::new()),
            policy,
            index,
            next_request: AtomicU64::new(1),
            next_worker: AtomicU32::new(0),
            migration_limit: config.migration_limit,
            orphans,
            credentials: config.credentials.clone(),
            health_interval: config.health_interval,
            // One executor and no DNS name: there is never a choice, so its events (work for
            // the engine every step) are not asked for.
            subscribe_kv_events: config.routing == RoutingKind::KvAware
                && (config.addresses.len() > 1 || discovers),
            epoch: watch::channel(0).0,
            healthy: watch::channel(0).0,
            reference: std::sync::OnceLock::new(),
            discovers,
        });
        let handle = Self { inner };
        for address in &config.addresses {
            match address {
                ExecutorAddress::Unix(path) => {
                    handle.add_worker(address.clone(), Target::Unix(path.clone()));
                }
                ExecutorAddress::Https { host, port } => {
                    // An IP literal is one worker; a name is resolved now and on a period.
                    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                        handle.add_worker(
                            address.clone(),
                            Target::Tcp {
                                addr: (ip, *port).into(),
                                host: host.clone(),
                            },
                        );
                    } else {
                        let weak = handle.downgrade();
                        tokio::spawn(discovery::follow(
                            move || ExecutorHandle::upgrade(&weak),
                            address.clone(),
                            config.discovery_interval,
                        ));
                    }
                }
            }
        }
        tokio::spawn(migrate(handle.downgrade(), orphan_rx));
        Ok(handle)
    }

    fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    fn upgrade(weak: &std::sync::Weak<Inner>) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }

    fn workers(&self) -> Vec<Arc<Worker>> {
        self.inner
            .workers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds a worker (a new address of `source`); returns its id.
    pub(crate) fn add_worker(&self, source: ExecutorAddress, target: Target) -> WorkerId {
        let id = WorkerId(self.inner.next_worker.fetch_add(1, Ordering::Relaxed));
        let conn = Connection::spawn(
            id,
            target.clone(),
            self.inner.credentials.clone(),
            Some(self.inner.orphans.clone()),
        );
        let health = Arc::new(Health::default());
        let mut tasks = vec![tokio::spawn(monitor(
            Arc::downgrade(&self.inner),
            id,
            conn.clone(),
            health.clone(),
        ))];
        if self.inner.subscribe_kv_events {
            tasks.push(tokio::spawn(follow_kv_events(
                self.inner.index.clone(),
                id,
                conn.clone(),
            )));
        }
        tracing::info!(worker = %target, %id, "worker joined the pool");
        self.inner
            .workers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(Worker {
                id,
                source,
                conn,
                health,
                tasks,
            }));
        self.inner.epoch.send_modify(|n| *n += 1);
        id
    }

    /// The targets of `source` in the pool now (discovery diffs against them).
    pub(crate) fn targets_of(&self, source: &ExecutorAddress) -> Vec<Target> {
        self.workers()
            .iter()
            .filter(|w| &w.source == source && !w.health.draining.load(Ordering::Relaxed))
            .map(|w| w.conn.target().clone())
            .collect()
    }

    /// Takes a worker out of routing; it leaves the pool once its requests are done.
    pub(crate) fn drain_worker(&self, target: &Target) {
        let Some(worker) = self
            .workers()
            .into_iter()
            .find(|w| w.conn.target() == target && !w.health.draining.load(Ordering::Relaxed))
        else {
            return;
        };
        worker.health.draining.store(true, Ordering::Relaxed);
        tracing::info!(worker = %target, id = %worker.id, "worker left discovery: draining");
        let weak = self.downgrade();
        tokio::spawn(async move {
            worker.conn.idle().await;
            if let Some(pool) = ExecutorHandle::upgrade(&weak) {
                pool.inner
                    .workers
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|w| w.id != worker.id);
                pool.inner
                    .index
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove_worker(worker.id);
                pool.inner.epoch.send_modify(|n| *n += 1);
                pool.refresh_healthy();
                tracing::info!(id = %worker.id, "worker left the pool");
            }
        });
    }

    fn refresh_healthy(&self) {
        let n = self.workers().iter().filter(|w| routable(w)).count();
        self.inner.healthy.send_if_modified(|h| {
            let changed = *h != n;
            *h = n;
            changed
        });
    }

    /// The `Info` the router serves: a worker whose model, vocabulary or eos ids differ is
    /// kept out of routing (state `incompatible`).
    pub fn set_reference(&self, info: &pb::InfoResponse) {
        let _ = self.inner.reference.set(Reference::of(info));
    }

    /// Healthy workers now, and on change.
    pub fn healthy_workers(&self) -> watch::Receiver<usize> {
        self.inner.healthy.subscribe()
    }

    /// The `--routing` policy's name.
    pub fn routing(&self) -> &'static str {
        self.inner.policy.name()
    }

    /// Every worker, for `/info`.
    pub fn status(&self) -> Vec<WorkerStatus> {
        let index = self
            .inner
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        self.workers()
            .iter()
            .map(|w| {
                let load = w.conn.load();
                WorkerStatus {
                    id: w.id.0,
                    address: w.conn.target().to_string(),
                    state: state_of(w),
                    in_flight: load.in_flight.load(Ordering::Relaxed),
                    requests: load.requests.load(Ordering::Relaxed),
                    prompt_tokens: load.prompt_tokens.load(Ordering::Relaxed),
                    cached_tokens: load.cached_tokens.load(Ordering::Relaxed),
                    kv_block_size: w.health.block_size.load(Ordering::Relaxed),
                    indexed_blocks: index.block_count(w.id),
                }
            })
            .collect()
    }

    /// Changes each time a worker connects (an executor may have restarted since), joins or
    /// leaves.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// Ends these live requests (None: every one) as aborted with `reason`, on every worker.
    /// Returns how many were live; requests submitted before the call are counted.
    pub async fn abort(&self, ids: Option<Vec<u64>>, reason: String) -> usize {
        let calls = self
            .workers()
            .into_iter()
            .map(|w| {
                let ids = ids.clone();
                let reason = reason.clone();
                async move { w.conn.abort(ids, reason).await }
            })
            .collect::<Vec<_>>();
        futures::future::join_all(calls).await.into_iter().sum()
    }

    /// Requests live in the executors now.
    pub async fn live(&self) -> usize {
        let calls = self
            .workers()
            .into_iter()
            .map(|w| async move { w.conn.live().await })
            .collect::<Vec<_>>();
        futures::future::join_all(calls).await.into_iter().sum()
    }

    /// Resolves once no request is live in any executor.
    pub async fn idle(&self) {
        let calls = self
            .workers()
            .into_iter()
            .map(|w| async move { w.conn.idle().await })
            .collect::<Vec<_>>();
        futures::future::join_all(calls).await;
    }

    /// Whether any worker is connected (the router can serve).
    pub fn is_connected(&self) -> bool {
        self.workers().iter().any(|w| w.conn.is_connected())
    }

    /// A client of a connected worker (a healthy one first), for Info and Health.
    pub async fn client(&self) -> Result<Client, String> {
        let mut workers = self.workers();
        workers.sort_by_key(|w| (!routable(w), !w.conn.is_connected()));
        let mut last = "no executor in the pool".to_string();
        for w in workers {
            match w.conn.client().await {
                Ok(c) => return Ok(c),
                Err(e) => last = format!("{}: {e}", w.conn.target()),
            }
        }
        Err(last)
    }

    /// Control clients of every connected worker (rollout control goes to all of them: one
    /// weight version across the pool).
    pub async fn control_clients(
        &self,
        max_message_bytes: usize,
    ) -> Result<Vec<(String, Client)>, String> {
        let mut clients = Vec::new();
        for w in self.workers() {
            if !w.conn.is_connected() || w.health.draining.load(Ordering::Relaxed) {
                continue;
            }
            let client = w
                .conn
                .control_client(max_message_bytes)
                .await
                .map_err(|e| format!("{}: {e}", w.conn.target()))?;
            clients.push((w.conn.target().to_string(), client));
        }
        if clients.is_empty() {
            return Err("no executor is connected".into());
        }
        Ok(clients)
    }

    /// Ends every request in flight with `reason` (the shutdown timeout ran out).
    pub fn fail_all(&self, reason: String) {
        for w in self.workers() {
            w.conn.fail_all(reason.clone());
        }
    }

    /// Sends a request; its outputs arrive on the returned receiver.
    pub fn submit(&self, request: pb::GenerateRequest) -> Submitted {
        let mut v = self.submit_batch(vec![request]);
        v.pop().expect("one request in, one handle out")
    }

    /// Routes each request to a worker and sends each worker its share in one message.
    pub fn submit_batch(&self, requests: Vec<pb::GenerateRequest>) -> Vec<Submitted> {
        let workers = self.workers();
        let mut views: Vec<WorkerView> = workers.iter().map(|w| view(w)).collect();
        let routable_count = views.iter().filter(|v| v.healthy).count();
        let mut shares: Vec<Vec<Submission>> = workers.iter().map(|_| Vec::new()).collect();
        let mut handles = Vec::with_capacity(requests.len());
        let mut lost = Vec::new();
        for mut request in requests {
            let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
            request.id = id;
            let (tx, rx) = mpsc::unbounded_channel();
            // What the worker must prefill: the prompt less what its cache is expected to hold.
            // One routable worker: no choice to make, nothing to hash.
            let (pick, charge) = if routable_count == 1 {
                let only = views.iter().find(|v| v.healthy).map(|v| v.id);
                (only, request.input_ids.len() as u64)
            } else {
                let mut prompt = Prompt::new(&request.input_ids);
                let pick = self.inner.policy.pick(&views, &mut prompt);
                let cached = pick
                    .and_then(|id| views.iter().find(|v| v.id == id))
                    .map_or(0, |v| {
                        self.inner.policy.expected_cached_tokens(v, &mut prompt)
                    });
                (pick, request.input_ids.len().saturating_sub(cached) as u64)
            };
            // Kept only where it could move: another worker exists, or may join (a DNS name).
            let resume = (self.inner.migration_limit > 0
                && (workers.len() > 1 || self.inner.discovers))
                .then(|| {
                    Box::new(Resume {
                        original: request.clone(),
                        generated: Vec::new(),
                        migrations: 0,
                    })
                });
            match pick.and_then(|id| views.iter().position(|v| v.id == id)) {
                Some(at) => {
                    let worker = &workers[at];
                    let target = CancelTarget::new(worker.conn.commands());
                    worker
                        .conn
                        .load()
                        .charge(charge, request.input_ids.len() as u64, false);
                    // Later picks of this batch see it.
                    views[at].in_flight += 1;
                    views[at].queued_tokens += charge;
                    handles.push((RequestGuard::new(id, target.clone()), rx));
                    shares[at].push(Submission {
                        request,
                        tx,
                        target,
                        charge,
                        started: false,
                        resume,
                    });
                }
                None => {
                    let (dead, _) = mpsc::unbounded_channel();
                    let target = CancelTarget::new(dead);
                    handles.push((RequestGuard::new(id, target), rx));
                    lost.push(tx);
                }
            }
        }
        for (worker, share) in workers.iter().zip(shares) {
            if !share.is_empty() {
                m::record_routed(&worker.conn.target().to_string(), share.len());
                worker.conn.submit(share);
            }
        }
        for tx in lost {
            let _ = tx.send(ExecutorEvent::Disconnected(
                "no executor is healthy (every worker is disconnected or failing its health \
                 checks)"
                    .into(),
            ));
        }
        handles
    }

    /// Continues an orphaned request on another healthy worker, or ends it saying why.
    fn place_orphan(&self, mut orphan: Orphan) {
        let Some(resume) = orphan.resume.as_mut() else {
            // Not kept: migration is off, or the pool had no other worker to move it to.
            let why = if self.inner.migration_limit == 0 {
                m::record_migration("refused");
                Unmovable::Off {
                    reason: orphan.reason,
                }
            } else {
                m::record_migration("no_worker");
                Unmovable::NoWorker {
                    reason: orphan.reason,
                }
            };
            let _ = orphan.tx.send(ExecutorEvent::Disconnected(why.to_string()));
            return;
        };
        let request = match migration::resumed_request(
            orphan.id,
            resume,
            self.inner.migration_limit,
            &orphan.reason,
        ) {
            Ok(Some(request)) => request,
            Ok(None) => {
                // Every token arrived; only the last output was lost with the worker.
                let _ = orphan.tx.send(ExecutorEvent::Output(pb::RequestOutput {
                    request_id: orphan.id,
                    finish_reason: pb::FinishReason::Length as i32,
                    ..Default::default()
                }));
                return;
            }
            Err(why) => {
                m::record_migration("refused");
                tracing::warn!(request = orphan.id, "{why}");
                let _ = orphan.tx.send(ExecutorEvent::Disconnected(why.to_string()));
                return;
            }
        };
        let workers = self.workers();
        let views: Vec<WorkerView> = workers
            .iter()
            .map(|w| {
                let mut v = view(w);
                v.healthy &= w.id != orphan.from;
                v
            })
            .collect();
        let pick = {
            let mut prompt = Prompt::new(&request.input_ids);
            self.inner.policy.pick(&views, &mut prompt)
        };
        let Some(worker) = pick.and_then(|id| workers.iter().find(|w| w.id == id)) else {
            m::record_migration("no_worker");
            let why = Unmovable::NoWorker {
                reason: orphan.reason,
            };
            tracing::warn!(request = orphan.id, "{why}");
            let _ = orphan.tx.send(ExecutorEvent::Disconnected(why.to_string()));
            return;
        };
        m::record_migration("moved");
        tracing::info!(
            request = orphan.id,
            from = %orphan.from,
            to = %worker.id,
            generated = request.resumed_tokens,
            "migrating a request"
        );
        orphan.target.retarget(worker.conn.commands());
        let charge = request.input_ids.len() as u64;
        worker.conn.load().charge(charge, charge, orphan.started);
        worker.conn.submit(vec![Submission {
            request,
            tx: orphan.tx,
            target: orphan.target,
            charge,
            started: orphan.started,
            resume: orphan.resume,
        }]);
    }
}

impl Membership for ExecutorHandle {
    fn targets_of(&self, source: &ExecutorAddress) -> Vec<Target> {
        ExecutorHandle::targets_of(self, source)
    }

    fn join(&self, source: ExecutorAddress, target: Target) {
        self.add_worker(source, target);
    }

    fn leave(&self, target: &Target) {
        self.drain_worker(target);
    }
}

fn routable(w: &Worker) -> bool {
    w.conn.is_connected()
        && w.health.healthy.load(Ordering::Relaxed)
        && !w.health.draining.load(Ordering::Relaxed)
        && !w.health.incompatible.load(Ordering::Relaxed)
}

fn state_of(w: &Worker) -> WorkerState {
    if w.health.draining.load(Ordering::Relaxed) {
        WorkerState::Draining
    } else if w.health.incompatible.load(Ordering::Relaxed) {
        WorkerState::Incompatible
    } else if !w.conn.is_connected() {
        WorkerState::Disconnected
    } else if w.health.healthy.load(Ordering::Relaxed) {
        WorkerState::Healthy
    } else {
        WorkerState::Unhealthy
    }
}

fn view(w: &Worker) -> WorkerView {
    let load = w.conn.load();
    WorkerView {
        id: w.id,
        healthy: routable(w),
        in_flight: load.in_flight.load(Ordering::Relaxed),
        // Load in tokens of engine work per step: the prompts still to prefill, and one
        // token per decoding sequence.
        queued_tokens: load.waiting_tokens.load(Ordering::Relaxed),
        running_tokens: u64::from(load.running.load(Ordering::Relaxed)),
        block_size: w.health.block_size.load(Ordering::Relaxed),
    }
}

/// Moves the requests lost workers leave behind, in the order they were lost.
async fn migrate(pool: std::sync::Weak<Inner>, mut orphans: mpsc::UnboundedReceiver<Orphan>) {
    while let Some(orphan) = orphans.recv().await {
        match ExecutorHandle::upgrade(&pool) {
            Some(pool) => pool.place_orphan(orphan),
            None => {
                let _ = orphan
                    .tx
                    .send(ExecutorEvent::Disconnected(orphan.reason.clone()));
            }
        }
    }
}

/// Reads a worker's Health and Stats every `health_interval`: a worker that fails is taken
/// out of routing and returns when it passes again. Its Stats feed /metrics (worker label)
/// and its block size the KV-aware policy.
async fn monitor(
    pool: std::sync::Weak<Inner>,
    id: WorkerId,
    conn: Connection,
    health: Arc<Health>,
) {
    let name = conn.target().to_string();
    let every =
        ExecutorHandle::upgrade(&pool).map_or(Duration::from_secs(1), |p| p.inner.health_interval);
    let mut client: Option<Client> = None;
    let mut connections = conn.connections();
    // The connection whose executor's Info was last compared with the pool's.
    let mut checked_epoch = 0;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A new connection is checked at once rather than at the next tick.
        tokio::select! {
            _ = tick.tick() => {}
            changed = connections.changed() => if changed.is_err() { return },
        }
        let ok = if conn.is_connected() {
            if client.is_none() {
                client = conn.client().await.ok();
            }
            match client.as_mut() {
                Some(c) => {
                    let epoch = *connections.borrow();
                    if epoch != checked_epoch {
                        let reference = ExecutorHandle::upgrade(&pool)
                            .and_then(|p| p.inner.reference.get().cloned());
                        if let Some(reference) = reference {
                            // Bounded like the health check: a hung executor must not
                            // hang its monitor.
                            let info = tokio::time::timeout(
                                Duration::from_secs(2),
                                c.info(pb::InfoRequest {}),
                            )
                            .await;
                            if let Ok(Ok(info)) = info {
                                compare(&name, &reference, &info.into_inner(), &health);
                                checked_epoch = epoch;
                            }
                        }
                    }
                    check(c, &name, &health).await
                }
                None => false,
            }
        } else {
            false
        };
        if !ok {
            client = None;
        }
        let was = health.healthy.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!(worker = %name, %id, "worker is healthy: routed to");
            } else {
                tracing::warn!(worker = %name, %id, "worker failed its health check: taken out of routing");
            }
        }
        m::set_worker_healthy(&name, ok);
        let Some(pool) = ExecutorHandle::upgrade(&pool) else {
            return;
        };
        pool.refresh_healthy();
        let load = conn.load();
        m::set_worker_load(
            &name,
            load.in_flight.load(Ordering::Relaxed),
            load.prompt_tokens.load(Ordering::Relaxed),
            load.cached_tokens.load(Ordering::Relaxed),
        );
    }
}

/// Marks a worker whose Info differs from the pool's (another model, vocabulary or eos ids):
/// its tokens would not mean what the router's tokenizer says they mean.
fn compare(name: &str, reference: &Reference, info: &pb::InfoResponse, health: &Health) {
    let theirs = Reference::of(info);
    let incompatible = &theirs != reference;
    if incompatible {
        tracing::error!(
            worker = %name,
            pool = ?reference,
            worker_serves = ?theirs,
            "the worker serves another model than the pool: kept out of routing"
        );
    }
    health.incompatible.store(incompatible, Ordering::Relaxed);
}

/// One Health and Stats round; false when either fails or the executor is not ready.
async fn check(client: &mut Client, name: &str, health: &Health) -> bool {
    let probe = async {
        let ready = client
            .health(pb::HealthRequest {})
            .await?
            .into_inner()
            .ready;
        let stats = client.stats(pb::StatsRequest {}).await?.into_inner();
        Ok::<_, tonic::Status>((ready, stats))
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok((ready, stats))) => {
            health
                .block_size
                .store(stats.kv_block_size, Ordering::Relaxed);
            m::set_executor_stats(name, &stats);
            ready
        }
        _ => false,
    }
}

/// Follows a worker's KV-cache events into the index, from each new connection on (a new
/// stream starts a new id sequence: what the index held of the worker is forgotten).
async fn follow_kv_events(index: SharedKvIndex, id: WorkerId, conn: Connection) {
    let mut connections = conn.connections();
    loop {
        if conn.is_connected() {
            index
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .reset(id);
            let stream = match conn.client().await {
                Ok(mut c) => c.kv_cache_events(pb::KvCacheEventsRequest {}).await,
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match stream {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(batch)) = stream.message().await {
                        let outcomes = index
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .apply_batch(id, &batch);
                        for outcome in outcomes {
                            if outcome != EventOutcome::Applied {
                                tracing::warn!(%id, ?outcome, "KV events: index of the worker is partial");
                            }
                        }
                    }
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(%id, "the executor publishes no KV-cache events: KV-aware routing sees no cached prefix on it");
                    return;
                }
                Err(_) => {}
            }
        }
        // Wait for the next connection (or retry a failed subscription after a moment).
        tokio::select! {
            changed = connections.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
