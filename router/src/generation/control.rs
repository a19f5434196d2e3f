//! Rollout control ordered against generation (docs/api.md, "Rollout control").
//!
//! An update (/update_weights*, /flush_cache, /release_memory) holds admission, so new
//! requests queue rather than fail; waits until nothing is left in the executor (or first
//! aborts what is there, when asked); runs its RPC; then lets the queue go. A pause holds
//! admission until /continue_generation, after aborting what runs (mode abort) or pausing the
//! engine with it (mode in_place). While any memory tag is released, generation is refused as
//! sleeping. One control operation runs at a time.
//!
//! Callers run operations on a task of their own (`tokio::spawn`): an operation is never cut
//! in half because its HTTP client went away.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::errors::RouterError;
use crate::executors::control::ControlRpc;
use crate::executors::pool::ExecutorHandle;
use crate::executors::scheduler::{HoldGuard, Scheduler};
use crate::generation::requests::{RequestId, RequestRegistry};
use crate::pb;

/// SGLang's pause modes that tensorgate serves (`retract` is not one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseMode {
    /// In-flight requests are aborted; new ones wait.
    Abort,
    /// The engine stops stepping and keeps its requests (and their KV cache); new ones wait.
    InPlace,
}

impl PauseMode {
    pub fn name(self) -> &'static str {
        match self {
            PauseMode::Abort => "abort",
            PauseMode::InPlace => "in_place",
        }
    }
}

struct State {
    weight_version: String,
    /// Memory tags released now, sorted.
    released: Vec<String>,
    /// A pause in force, and the hold that keeps new requests queued.
    pause: Option<(PauseMode, HoldGuard)>,
    /// trtllm-serve's bucketed /update_weights between its first bucket and its finalize:
    /// the model holds a mix of old and new weights, so nothing may generate.
    update_in_progress: Option<HoldGuard>,
}

/// What a control operation did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The executor's answer (weight_version always filled with the current one).
    pub reply: pb::ControlResponse,
    /// Generations aborted on the way.
    pub aborted: usize,
}

pub struct Control {
    rpc: ControlRpc,
    /// What the engine can do (Info.control).
    features: pb::ControlFeatures,
    executor: ExecutorHandle,
    scheduler: Scheduler,
    registry: Arc<RequestRegistry>,
    /// One control operation at a time.
    op: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

impl Control {
    /// `info`: the executor's Info at startup (its weight_version and released tags).
    pub fn new(
        rpc: ControlRpc,
        executor: ExecutorHandle,
        scheduler: Scheduler,
        info: &pb::InfoResponse,
    ) -> Self {
        let control = Self {
            rpc,
            features: info.control.clone().unwrap_or_default(),
            executor,
            scheduler,
            registry: Arc::new(RequestRegistry::default()),
            op: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                weight_version: info.weight_version.clone(),
                released: Vec::new(),
                pause: None,
                update_in_progress: None,
            }),
        };
        control.set_released(info.released_memory_tags.clone());
        control
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Each change under this lock is a plain assignment: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn registry(&self) -> &Arc<RequestRegistry> {
        &self.registry
    }

    pub fn engine(&self) -> &str {
        self.rpc.engine()
    }

    pub fn features(&self) -> &pb::ControlFeatures {
        &self.features
    }

    pub fn weight_version(&self) -> String {
        self.state().weight_version.clone()
    }

    pub fn released_tags(&self) -> Vec<String> {
        self.state().released.clone()
    }

    pub fn paused(&self) -> Option<PauseMode> {
        self.state().pause.as_ref().map(|(mode, _)| *mode)
    }

    /// Why generation is refused now, if engine memory is released.
    pub fn sleeping(&self) -> Option<String> {
        sleeping_message(&self.state().released)
    }

    fn set_released(&self, mut tags: Vec<String>) {
        tags.sort();
        tags.dedup();
        let message = sleeping_message(&tags);
        self.state().released = tags;
        self.scheduler.set_sleeping(message);
    }

    /// Takes the engine's state from a control reply: every reply carries the released
    /// tags and the weight_version (backends/trtllm/tensorgate/executor/server.py).
    fn note(&self, mut reply: pb::ControlResponse) -> pb::ControlResponse {
        self.set_released(reply.released_memory_tags.clone());
        let mut state = self.state();
        if reply.weight_version.is_empty() {
            reply.weight_version = state.weight_version.clone();
        } else {
            state.weight_version = reply.weight_version.clone();
        }
        reply
    }

    /// What a reply without an RPC says.
    fn local_reply(&self, message: String) -> pb::ControlResponse {
        pb::ControlResponse {
            weight_version: self.weight_version(),
            message,
            ..Default::default()
        }
    }

    /// Holds admission and waits until nothing is left in the executor, aborting what is
    /// there first when `abort` gives a reason. Under an in-place pause the engine never
    /// finishes what it keeps, so waiting for it is refused.
    async fn quiesce(&self, abort: Option<&str>) -> Result<(HoldGuard, usize), RouterError> {
        let hold = self.scheduler.hold().await;
        let aborted = match abort {
            Some(reason) => self.executor.abort(None, reason.to_string()).await,
            None => {
                // Counted by the dispatcher after the hold is in force: every admission is
                // in the count by then.
                if self.paused() == Some(PauseMode::InPlace) && self.executor.live().await > 0 {
                    return Err(RouterError::Conflict(
                        "generation is paused in place with requests in the engine, which will \
                         not finish before /continue_generation: continue first, or pass \
                         \"abort_all_requests\": true"
                            .into(),
                    ));
                }
                0
            }
        };
        self.executor.idle().await;
        Ok((hold, aborted))
    }

    pub async fn release_memory(&self, tags: Vec<String>) -> Result<Outcome, RouterError> {
        let _op = self.op.lock().await;
        let (_hold, aborted) = self.quiesce(None).await?;
        let reply = self.rpc.release_memory(tags).await?;
        Ok(Outcome {
            reply: self.note(reply),
            aborted,
        })
    }

    /// Needs no drain: nothing generates while any tag is released.
    pub async fn resume_memory(&self, tags: Vec<String>) -> Result<Outcome, RouterError> {
        let _op = self.op.lock().await;
        let reply = self.rpc.resume_memory(tags).await?;
        Ok(Outcome {
            reply: self.note(reply),
            aborted: 0,
        })
    }

    /// Any weight update. A trtllm-serve bucket (`cuda_ipc`) keeps generation held until the
    /// finalize (`{"weights": null}`) that follows it.
    pub async fn update_weights(
        &self,
        request: pb::UpdateWeightsRequest,
        abort_all_requests: bool,
    ) -> Result<Outcome, RouterError> {
        use pb::update_weights_request::Source;
        let _op = self.op.lock().await;
        let reason = "aborted for a weight update (abort_all_requests)";
        let (hold, aborted) = self.quiesce(abort_all_requests.then_some(reason)).await?;
        let bucket = matches!(request.source, Some(Source::CudaIpc(_)));
        let finalize = matches!(request.source, Some(Source::Finalize(_)));
        let reply = self.rpc.update_weights(request).await?;
        {
            let mut state = self.state();
            if bucket {
                state.update_in_progress.get_or_insert(hold);
            } else if finalize {
                state.update_in_progress = None;
            }
        }
        Ok(Outcome {
            reply: self.note(reply),
            aborted,
        })
    }

    /// True between a trtllm-serve weight bucket and its finalize.
    pub fn update_in_progress(&self) -> bool {
        self.state().update_in_progress.is_some()
    }

    pub async fn flush_cache(&self) -> Result<Outcome, RouterError> {
        let _op = self.op.lock().await;
        let (_hold, aborted) = self.quiesce(None).await?;
        let reply = self.rpc.flush_cache().await?;
        Ok(Outcome {
            reply: self.note(reply),
            aborted,
        })
    }

    pub async fn pause(&self, mode: PauseMode) -> Result<Outcome, RouterError> {
        let _op = self.op.lock().await;
        match self.paused() {
            Some(current) if current == mode => {
                return Ok(Outcome {
                    reply: self.local_reply(format!(
                        "generation was already paused (mode {})",
                        mode.name()
                    )),
                    aborted: 0,
                })
            }
            Some(current) => {
                return Err(RouterError::Conflict(format!(
                    "generation is paused in mode {}; call /continue_generation before pausing \
                     in mode {}",
                    current.name(),
                    mode.name()
                )))
            }
            None => {}
        }
        let hold = self.scheduler.hold().await;
        let (reply, aborted) = match mode {
            PauseMode::Abort => {
                let aborted = self
                    .executor
                    .abort(None, "aborted by /pause_generation (mode abort)".into())
                    .await;
                self.executor.idle().await;
                let reply = self.local_reply(format!(
                    "generation paused (mode abort): {aborted} request(s) aborted, new ones wait \
                     for /continue_generation"
                ));
                (reply, aborted)
            }
            PauseMode::InPlace => (self.note(self.rpc.pause_generation().await?), 0),
        };
        self.state().pause = Some((mode, hold));
        Ok(Outcome { reply, aborted })
    }

    pub async fn continue_generation(&self) -> Result<Outcome, RouterError> {
        let _op = self.op.lock().await;
        let reply = match self.paused() {
            None => self.local_reply("generation was not paused".into()),
            Some(PauseMode::Abort) => self.local_reply("generation continued".into()),
            Some(PauseMode::InPlace) => self.note(self.rpc.continue_generation().await?),
        };
        // Dropping the pause's hold lets the queue go.
        self.state().pause = None;
        Ok(Outcome { reply, aborted: 0 })
    }

    /// /abort_request {"rid"}: every generation under that id; 404 if none is live.
    pub async fn abort_request(&self, id: &RequestId) -> Result<Outcome, RouterError> {
        let aborted = self
            .registry
            .abort_id(id, &format!("aborted by /abort_request (rid {id})"));
        if aborted.count == 0 {
            return Err(RouterError::NotFound(format!(
                "no request with rid {id:?} is queued or running (unknown, or finished already)"
            )));
        }
        if !aborted.executor_ids.is_empty() {
            let reason = format!("aborted by /abort_request (rid {id})");
            self.executor
                .abort(Some(aborted.executor_ids), reason)
                .await;
        }
        Ok(Outcome {
            reply: self.local_reply(format!("{} generation(s) aborted", aborted.count)),
            aborted: aborted.count,
        })
    }

    /// /abort_request {"abort_all": true}: every generation, queued, held and running.
    pub async fn abort_all(&self) -> Outcome {
        let reason = "aborted by /abort_request (abort_all)";
        let aborted = self.registry.abort_all(reason);
        if !aborted.executor_ids.is_empty() {
            self.executor
                .abort(Some(aborted.executor_ids), reason.into())
                .await;
        }
        Outcome {
            reply: self.local_reply(format!("{} generation(s) aborted", aborted.count)),
            aborted: aborted.count,
        }
    }

    /// Shutting down: what a pause (or an unfinished bucketed update) holds can never start,
    /// and what an in-place pause keeps in the engine can never finish, since the control
    /// routes are closed while draining. Both are ended now rather than at the drain timeout.
    pub fn on_shutdown(&self) {
        let (holding, in_place) = {
            let state = self.state();
            let in_place = matches!(state.pause, Some((PauseMode::InPlace, _)));
            (
                state.pause.is_some() || state.update_in_progress.is_some(),
                in_place,
            )
        };
        if holding {
            self.scheduler.stop();
        }
        if in_place {
            self.executor
                .fail_all("the server is shutting down while generation is paused in place".into());
        }
    }

    /// Keeps weight_version and the released tags true to the executor across its restarts
    /// (a new executor has its initial weights and nothing released).
    pub fn follow_reconnects(self: &Arc<Self>) {
        let control = Arc::downgrade(self);
        let mut connections = self.executor.connections();
        tokio::spawn(async move {
            // The first connection is the one Info was read on at startup.
            let _ = connections.borrow_and_update();
            while connections.changed().await.is_ok() {
                let Some(control) = control.upgrade() else {
                    return;
                };
                match control.executor.client().await {
                    Ok(mut client) => match client.info(pb::InfoRequest {}).await {
                        Ok(info) => {
                            let info = info.into_inner();
                            control.set_released(info.released_memory_tags);
                            control.state().weight_version = info.weight_version;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot re-read Info after reconnecting")
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot re-read Info after reconnecting"),
                }
            }
        });
    }
}

fn sleeping_message(released: &[String]) -> Option<String> {
    (!released.is_empty()).then(|| {
        format!(
            "engine memory is released (tags: {}); generation resumes after POST /resume_memory",
            released.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    //! Rollout control against a fake executor on a real socket, through the real scheduler,
    //! `Infer::start` and generation streams.

    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;
    use crate::executors::scheduler::SchedulerConfig;
    use crate::executors::testing::{self, Fake, Started};
    use crate::generation::detokenizer::tests::byte_level_tokenizer;
    use crate::generation::infer::Infer;
    use crate::generation::parameters::GenerateParameters;
    use crate::generation::stream::{collect, Completed};
    use crate::generation::tokenizer::TextTokenizer;
    use crate::generation::validation::Limits;
    use pb::update_weights_request::Source;

    struct Rig {
        started: Started,
        infer: Arc<Infer>,
    }

    type Generation = JoinHandle<Result<Completed, RouterError>>;

    async fn rig_with(step_ms: u64, max_queue_wait: Duration) -> Rig {
        let started = testing::start(Duration::from_millis(step_ms)).await;
        let executor = started.executor.clone();
        let scheduler = Scheduler::spawn(
            executor.clone(),
            SchedulerConfig {
                token_budget: 100_000,
                max_batch_size: 64,
                max_queue_wait,
            },
        );
        let control = Arc::new(Control::new(
            ControlRpc::new(executor.clone(), 1 << 20, "fake".into()),
            executor.clone(),
            scheduler.clone(),
            &Fake::info(),
        ));
        let limits = Limits {
            max_input_tokens: 100,
            max_total_tokens: 200,
            max_top_n_tokens: 0,
            max_stop_sequences: 4,
            max_stop_sequence_bytes: 64,
            vocab_size: 256,
            max_best_of: 2,
            features: pb::Features::default(),
        };
        let infer = Arc::new(Infer::new(
            executor,
            scheduler,
            TextTokenizer::from_tokenizer(byte_level_tokenizer()),
            None,
            false,
            limits,
            16,
            control,
        ));
        Rig { started, infer }
    }

    async fn rig(step_ms: u64) -> Rig {
        rig_with(step_ms, Duration::from_secs(60)).await
    }

    impl Rig {
        fn control(&self) -> Arc<Control> {
            self.infer.control().clone()
        }

        async fn generate(&self, rid: &str, tokens: u32) -> Generation {
            let infer = self.infer.clone();
            let params = GenerateParameters {
                max_new_tokens: Some(i64::from(tokens)),
                ..Default::default()
            };
            let mut p = infer
                .prepare_ids(vec![1, 2, 3], &params, "input_ids")
                .await
                .expect("valid request");
            p.request_id = Some(RequestId(rid.into()));
            tokio::spawn(async move { collect(infer.start(p).await?).await })
        }

        fn log(&self) -> Vec<String> {
            self.started.fake.log()
        }

        async fn wait_log(&self, line: &str) {
            for _ in 0..500 {
                if self.log().iter().any(|l| l == line) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{line:?} never logged: {:?}", self.log());
        }

        fn at(&self, line: &str) -> usize {
            let log = self.log();
            log.iter()
                .position(|l| l == line)
                .unwrap_or_else(|| panic!("{line:?} not in {log:?}"))
        }
    }

    fn from_disk(path: &str) -> pb::UpdateWeightsRequest {
        pb::UpdateWeightsRequest {
            source: Some(Source::ModelPath(path.into())),
            ..Default::default()
        }
    }

    async fn done(g: Generation) -> Result<Completed, RouterError> {
        tokio::time::timeout(Duration::from_secs(10), g)
            .await
            .expect("the generation ends, not hangs")
            .expect("task")
    }

    #[tokio::test]
    async fn an_update_waits_for_the_requests_in_flight_and_holds_new_ones() {
        let r = rig(20).await;
        let a = r.generate("a", 5).await;
        r.wait_log("submit 1").await;
        let control = r.control();
        let update =
            tokio::spawn(async move { control.update_weights(from_disk("/ckpt"), false).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let b = r.generate("b", 2).await;
        let a = done(a).await.expect("a completes");
        assert_eq!(a.end.weight_version, "0", "a ran on the old weights");
        let out = update.await.expect("task").expect("updated");
        assert_eq!(out.reply.weight_version, "1");
        let b = done(b).await.expect("b completes");
        assert_eq!(
            b.end.weight_version, "1",
            "b was held until the update was in"
        );
        assert!(r.at("finish 1") < r.at("UpdateWeights live=0"));
        assert!(r.at("UpdateWeights live=0") < r.at("submit 2"));
        assert_eq!(r.control().weight_version(), "1");
    }

    #[tokio::test]
    async fn abort_all_requests_ends_the_requests_in_flight_first() {
        let r = rig(20).await;
        let a = r.generate("a", 100).await;
        r.wait_log("submit 1").await;
        let out = r
            .control()
            .update_weights(from_disk("/ckpt"), true)
            .await
            .expect("updated");
        assert_eq!(out.aborted, 1);
        let e = done(a).await.expect_err("aborted");
        assert!(matches!(e, RouterError::Aborted(_)), "{e}");
        assert!(r.at("cancel 1") < r.at("UpdateWeights live=0"));
    }

    #[tokio::test]
    async fn a_refused_update_changes_nothing_and_lets_the_queue_go() {
        let r = rig(10).await;
        let e = r
            .control()
            .update_weights(from_disk("bad"), false)
            .await
            .expect_err("refused");
        assert_eq!(e.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.to_string().contains("lm_head.weight"), "{e}");
        assert_eq!(r.control().weight_version(), "0");
        let b = done(r.generate("b", 2).await).await.expect("not held");
        assert_eq!(b.end.weight_version, "0");
    }

    #[tokio::test]
    async fn pause_abort_aborts_in_flight_and_holds_new_until_continue() {
        let r = rig(20).await;
        let a = r.generate("a", 100).await;
        r.wait_log("submit 1").await;
        let out = r.control().pause(PauseMode::Abort).await.expect("paused");
        assert_eq!(out.aborted, 1);
        assert!(matches!(done(a).await, Err(RouterError::Aborted(_))));
        let b = r.generate("b", 2).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!b.is_finished());
        assert!(!r.log().iter().any(|l| l == "submit 2"), "{:?}", r.log());
        assert_eq!(r.control().paused(), Some(PauseMode::Abort));
        r.control().continue_generation().await.expect("continued");
        done(b).await.expect("b runs after the continue");
    }

    #[tokio::test]
    async fn pause_in_place_keeps_requests_and_refuses_an_update_that_would_wait_for_them() {
        let r = rig(20).await;
        let a = r.generate("a", 10).await;
        r.wait_log("submit 1").await;
        r.control().pause(PauseMode::InPlace).await.expect("paused");
        let b = r.generate("b", 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!a.is_finished(), "the engine keeps it, paused");
        assert!(!r.log().iter().any(|l| l == "submit 2"));
        let e = r
            .control()
            .update_weights(from_disk("/ckpt"), false)
            .await
            .expect_err("would wait forever");
        assert_eq!(e.status(), axum::http::StatusCode::CONFLICT);
        assert!(e.to_string().contains("abort_all_requests"), "{e}");
        let e = r
            .control()
            .pause(PauseMode::Abort)
            .await
            .expect_err("another mode");
        assert_eq!(e.status(), axum::http::StatusCode::CONFLICT);
        r.control().continue_generation().await.expect("continued");
        assert_eq!(done(a).await.expect("a resumes").end.generated_tokens, 10);
        done(b).await.expect("b runs");
        assert!(r.at("PauseGeneration live=1") < r.at("ContinueGeneration live=1"));
    }

    #[tokio::test]
    async fn released_memory_refuses_generation_as_sleeping_until_resumed() {
        let r = rig(10).await;
        r.control().pause(PauseMode::Abort).await.expect("paused");
        let held = r.generate("held", 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let out = r.control().release_memory(vec![]).await.expect("released");
        assert_eq!(out.reply.released_memory_tags, vec!["kv_cache", "model"]);
        let e = done(held).await.expect_err("a held request is refused");
        assert!(matches!(e, RouterError::Sleeping(_)), "{e}");
        r.control().continue_generation().await.expect("continued");
        let e = done(r.generate("new", 2).await)
            .await
            .expect_err("sleeping");
        assert_eq!(e.error_type(), "sleeping");
        assert!(e.to_string().contains("kv_cache, model"), "{e}");
        assert!(e.to_string().contains("/resume_memory"), "{e}");
        let e = r
            .control()
            .update_weights(from_disk("/ckpt"), false)
            .await
            .expect_err("no weights to update");
        assert_eq!(e.status(), axum::http::StatusCode::CONFLICT);
        r.control()
            .resume_memory(vec!["model".into()])
            .await
            .expect("model back");
        assert_eq!(r.control().released_tags(), vec!["kv_cache"]);
        assert!(r.control().sleeping().is_some(), "kv_cache still released");
        r.control().resume_memory(vec![]).await.expect("all back");
        assert!(r.control().sleeping().is_none());
        done(r.generate("after", 2).await)
            .await
            .expect("serves again");
    }

    #[tokio::test]
    async fn abort_request_by_rid_ends_running_and_held_requests() {
        let r = rig(20).await;
        let a = r.generate("run-1", 100).await;
        r.wait_log("submit 1").await;
        let out = r
            .control()
            .abort_request(&RequestId("run-1".into()))
            .await
            .expect("found");
        assert_eq!(out.aborted, 1);
        assert!(matches!(done(a).await, Err(RouterError::Aborted(_))));
        r.wait_log("cancel 1").await;
        let e = r
            .control()
            .abort_request(&RequestId("nope".into()))
            .await
            .expect_err("unknown");
        assert_eq!(e.status(), axum::http::StatusCode::NOT_FOUND);

        r.control().pause(PauseMode::Abort).await.expect("paused");
        let held = r.generate("held-1", 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.control()
            .abort_request(&RequestId("held-1".into()))
            .await
            .expect("found while held");
        assert!(matches!(done(held).await, Err(RouterError::Aborted(_))));
        let all = r.generate("x", 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(r.control().abort_all().await.aborted, 1);
        assert!(matches!(done(all).await, Err(RouterError::Aborted(_))));
        assert!(r.control().registry().is_empty());
        r.control().continue_generation().await.expect("continued");
        assert!(!r.log().iter().any(|l| l == "submit 2" || l == "submit 3"));
    }

    #[tokio::test]
    async fn a_held_request_whose_client_leaves_is_freed() {
        let r = rig(10).await;
        r.control().pause(PauseMode::Abort).await.expect("paused");
        let held = r.generate("gone", 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(r.infer.in_flight(), 1);
        held.abort(); // the client went away: its handler future is dropped
        let _ = held.await;
        assert_eq!(r.infer.in_flight(), 0, "its slot is free");
        assert!(r.control().registry().is_empty(), "and it is unlisted");
        r.control().continue_generation().await.expect("continued");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !r.log().iter().any(|l| l.starts_with("submit")),
            "never sent: {:?}",
            r.log()
        );
    }

    #[tokio::test]
    async fn shutdown_refuses_what_a_pause_holds() {
        let r = rig(10).await;
        r.control().pause(PauseMode::Abort).await.expect("paused");
        let held = r.generate("h", 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.control().on_shutdown();
        let e = done(held).await.expect_err("refused");
        assert_eq!(e.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn bucketed_updates_hold_generation_until_the_finalize() {
        let r = rig(10).await;
        let bucket = pb::UpdateWeightsRequest {
            source: Some(Source::CudaIpc(pb::CudaIpcWeights {
                handles_by_gpu: [("GPU-0".to_string(), vec![1, 2, 3])].into(),
            })),
            ..Default::default()
        };
        r.control()
            .update_weights(bucket, false)
            .await
            .expect("bucket");
        assert!(r.control().update_in_progress());
        let b = r.generate("b", 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !b.is_finished(),
            "held between the buckets and the finalize"
        );
        let finalize = pb::UpdateWeightsRequest {
            source: Some(Source::Finalize(true)),
            weight_version: "step-7".into(),
            ..Default::default()
        };
        r.control()
            .update_weights(finalize, false)
            .await
            .expect("finalized");
        assert!(!r.control().update_in_progress());
        assert_eq!(done(b).await.expect("runs").end.weight_version, "step-7");
    }

    #[tokio::test]
    async fn time_held_does_not_count_against_the_queue_wait() {
        let r = rig_with(10, Duration::from_millis(150)).await;
        r.control().pause(PauseMode::Abort).await.expect("paused");
        let b = r.generate("b", 2).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        r.control().continue_generation().await.expect("continued");
        done(b).await.expect("admitted, not timed out");
    }
}
