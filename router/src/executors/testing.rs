//! A fake executor for the router's tests of rollout control: served by tonic on a real unix
//! socket, it steps every live request one token per `step` (the last output stamped with the
//! weight version), answers the control RPCs as state, and logs what it saw in order.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::executors::pool::ExecutorHandle;
use crate::pb;
use crate::pb::executor_server::{Executor, ExecutorServer};

#[derive(Default)]
struct State {
    /// Live requests: id → tokens still to produce.
    live: BTreeMap<u64, u32>,
    paused: bool,
    updates: u32,
    version: String,
    released: Vec<String>,
    log: Vec<String>,
}

#[derive(Clone)]
pub struct Fake {
    state: Arc<Mutex<State>>,
    step: Duration,
}

pub const MEMORY_TAGS: [&str; 2] = ["kv_cache", "model"];

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake state")
    }

    /// What happened, in order: `submit N`, `cancel N`, `finish N`, and each control RPC as
    /// `Name live=K` (K: requests live in the fake when it came).
    pub fn log(&self) -> Vec<String> {
        self.state().log.clone()
    }

    fn control(&self, name: &str) -> pb::ControlResponse {
        let mut s = self.state();
        let line = format!("{name} live={}", s.live.len());
        s.log.push(line);
        pb::ControlResponse {
            weight_version: s.version.clone(),
            released_memory_tags: s.released.clone(),
            ..Default::default()
        }
    }

    pub fn info() -> pb::InfoResponse {
        pb::InfoResponse {
            engine: "fake".into(),
            weight_version: "0".into(),
            vocab_size: 256,
            control: Some(pb::ControlFeatures {
                memory_tags: MEMORY_TAGS.iter().map(|t| t.to_string()).collect(),
                update_from_disk: true,
                update_from_tensors: true,
                update_from_cuda_ipc: true,
                flush_cache: true,
                pause_in_place: true,
            }),
            ..Default::default()
        }
    }
}

impl Fake {
    fn apply(&self, cmd: pb::GenerateCommand) {
        let mut s = self.state();
        for id in cmd.cancel_ids {
            if s.live.remove(&id).is_some() {
                s.log.push(format!("cancel {id}"));
            }
        }
        for r in cmd.requests {
            s.log.push(format!("submit {}", r.id));
            s.live.insert(r.id, r.max_new_tokens.max(1));
        }
    }

    /// One engine step: a token for every live request, unless paused.
    fn step(&self, iteration: &mut u64) -> Option<pb::IterationOutput> {
        let mut s = self.state();
        if s.paused || s.live.is_empty() {
            return None;
        }
        *iteration += 1;
        let version = s.version.clone();
        let mut outputs = Vec::new();
        let mut done = Vec::new();
        for (id, left) in s.live.iter_mut() {
            *left -= 1;
            let last = *left == 0;
            outputs.push(pb::RequestOutput {
                request_id: *id,
                token_ids: vec![100 + (*iteration % 100) as u32],
                finish_reason: if last {
                    pb::FinishReason::Length as i32
                } else {
                    0
                },
                weight_version: if last { version.clone() } else { String::new() },
                ..Default::default()
            });
            if last {
                done.push(*id);
            }
        }
        for id in done {
            s.live.remove(&id);
            s.log.push(format!("finish {id}"));
        }
        Some(pb::IterationOutput {
            iteration: *iteration,
            outputs,
        })
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::IterationOutput, Status>> + Send>>;

#[tonic::async_trait]
impl Executor for Fake {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(Fake::info()))
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
        Err(Status::unimplemented("fake"))
    }
    async fn release_memory(
        &self,
        r: Request<pb::MemoryRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let mut tags = r.into_inner().tags;
        if tags.is_empty() {
            tags = MEMORY_TAGS.iter().map(|t| t.to_string()).collect();
        }
        {
            let mut s = self.state();
            s.released.extend(tags);
            s.released.sort();
            s.released.dedup();
        }
        Ok(Response::new(self.control("ReleaseMemory")))
    }
    async fn resume_memory(
        &self,
        r: Request<pb::MemoryRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let tags = r.into_inner().tags;
        {
            let mut s = self.state();
            if tags.is_empty() {
                s.released.clear();
            } else {
                s.released.retain(|t| !tags.contains(t));
            }
        }
        Ok(Response::new(self.control("ResumeMemory")))
    }
    async fn update_weights(
        &self,
        r: Request<pb::UpdateWeightsRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let r = r.into_inner();
        {
            let mut s = self.state();
            if s.released.iter().any(|t| t == "model") {
                return Err(Status::failed_precondition("the weights are released"));
            }
            if matches!(r.source, Some(pb::update_weights_request::Source::ModelPath(ref p)) if p == "bad")
            {
                return Err(Status::invalid_argument("`lm_head.weight`: shape mismatch"));
            }
            s.updates += 1;
            s.version = if r.weight_version.is_empty() {
                s.updates.to_string()
            } else {
                r.weight_version.clone()
            };
        }
        Ok(Response::new(self.control("UpdateWeights")))
    }
    async fn flush_cache(
        &self,
        _: Request<pb::FlushCacheRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        Ok(Response::new(self.control("FlushCache")))
    }
    async fn pause_generation(
        &self,
        _: Request<pb::PauseGenerationRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        self.state().paused = true;
        Ok(Response::new(self.control("PauseGeneration")))
    }
    async fn continue_generation(
        &self,
        _: Request<pb::ContinueGenerationRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        self.state().paused = false;
        Ok(Response::new(self.control("ContinueGeneration")))
    }
    type GenerateStream = OutStream;
    async fn generate(
        &self,
        request: Request<Streaming<pb::GenerateCommand>>,
    ) -> Result<Response<OutStream>, Status> {
        let mut commands = request.into_inner();
        let me = self.clone();
        let out = async_stream::stream! {
            let mut tick = tokio::time::interval(me.step);
            let mut iteration = 0u64;
            loop {
                tokio::select! {
                    cmd = commands.message() => {
                        let Ok(Some(cmd)) = cmd else { break };
                        me.apply(cmd);
                    }
                    _ = tick.tick() => {
                        if let Some(out) = me.step(&mut iteration) {
                            yield Ok(out);
                        }
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(out)))
    }
}

/// A fake on a fresh socket, and the router's handle to it (connected).
pub struct Started {
    pub fake: Fake,
    pub executor: ExecutorHandle,
    dir: std::path::PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn start(step: Duration) -> Started {
    let dir = std::env::temp_dir().join(format!(
        "tg-fake-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let socket = dir.join("fake.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let fake = Fake {
        state: Arc::new(Mutex::new(State {
            version: "0".into(),
            ..Default::default()
        })),
        step,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ExecutorServer::new(fake.clone()))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    let executor = ExecutorHandle::spawn(socket);
    for _ in 0..500 {
        if executor.is_connected() {
            return Started {
                fake,
                executor,
                dir,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the fake executor never connected");
}
