//! Handlers of the rollout-control routes: each checks what the engine can do, reads its
//! body (`payload`), and runs the operation, ordered against generation by
//! `generation::control`, on a task of its own so that a client that leaves does not cut it
//! in half.

use std::future::Future;

use axum::extract::{Request, State};
use axum::{Extension, Json};

use crate::errors::RouterError;
use crate::generation::control::{Control, Outcome, PauseMode};
use crate::generation::requests::RequestId;
use crate::http::responses::ControlErrors;
use crate::http::rl::payload::{read_json, RlPayloadLimit};
use crate::http::rl::schemas::{
    AbortRequest, ControlResponse, EmptyRequest, MemoryRequest, PauseRequest,
    UpdateFromDiskRequest, UpdateFromTensorRequest, UpdateWeightsRequest, WeightVersion,
};
use crate::http::state::AppState;
use crate::pb;
use crate::pb::update_weights_request::Source;

type Reply = Result<Json<ControlResponse>, RouterError>;

/// Longest weight_version label accepted.
const MAX_WEIGHT_VERSION_CHARS: usize = 256;

/// Runs a control operation to its end whatever happens to the HTTP request.
async fn detached<F>(op: F) -> Result<Outcome, RouterError>
where
    F: Future<Output = Result<Outcome, RouterError>> + Send + 'static,
{
    tokio::spawn(op)
        .await
        .map_err(|e| RouterError::ControlFailed(format!("the control operation failed: {e}")))?
}

/// 501 naming the engine when it cannot do `what`.
fn require(control: &Control, can: bool, what: &str) -> Result<(), RouterError> {
    if can {
        Ok(())
    } else {
        Err(RouterError::NotImplemented(format!(
            "the {} engine cannot {what}",
            control.engine()
        )))
    }
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> RouterError {
    RouterError::BadPayload {
        field: field.into(),
        reason: reason.into(),
    }
}

fn weight_version(given: Option<String>) -> Result<String, RouterError> {
    match given {
        None => Ok(String::new()),
        Some(v) if v.trim().is_empty() => Err(bad(
            "weight_version",
            "must not be empty (leave it out to number the update)",
        )),
        Some(v) if v.chars().count() > MAX_WEIGHT_VERSION_CHARS => Err(bad(
            "weight_version",
            format!("must be at most {MAX_WEIGHT_VERSION_CHARS} characters"),
        )),
        Some(v) => Ok(v),
    }
}

/// The answer: the executor's message (or `default`), the current weight_version, and what
/// the route reports besides.
fn answer(outcome: Outcome, default: &str) -> ControlResponse {
    let Outcome { reply, .. } = outcome;
    ControlResponse {
        success: true,
        message: if reply.message.is_empty() {
            default.to_string()
        } else {
            reply.message
        },
        weight_version: reply.weight_version,
        status: None,
        released_memory_tags: None,
        memory_delta_bytes: None,
        tensors_updated: None,
        num_aborted_requests: None,
    }
}

/// trtllm-serve answers its routes with `{"status": "success"}`
/// (tensorrt_llm/serve/openai_server.py): kept beside tensorgate's fields.
fn trtllm(mut r: ControlResponse) -> ControlResponse {
    r.status = Some("success".into());
    r
}

fn memory_answer(outcome: Outcome, default: &str) -> ControlResponse {
    let released = outcome.reply.released_memory_tags.clone();
    let delta = outcome.reply.memory_delta_bytes;
    let mut r = trtllm(answer(outcome, default));
    r.released_memory_tags = Some(released);
    r.memory_delta_bytes = Some(delta);
    r
}

fn update_answer(outcome: Outcome, aborting: bool) -> ControlResponse {
    let tensors = outcome.reply.tensors_updated;
    let aborted = outcome.aborted;
    let mut r = answer(outcome, "weights updated");
    r.tensors_updated = Some(tensors);
    r.num_aborted_requests = aborting.then_some(aborted);
    r
}

/// The tags to send; the executor knows its vocabulary (TensorRT-LLM's memory tags, some of
/// them no-ops on a given engine) and refuses an unknown one naming the valid ones.
fn memory_tags(
    control: &Control,
    tags: Option<Vec<String>>,
    what: &str,
) -> Result<Vec<String>, RouterError> {
    require(control, !control.features().memory_tags.is_empty(), what)?;
    let tags = tags.unwrap_or_default();
    if let Some(i) = tags.iter().position(|t| t.trim().is_empty()) {
        return Err(bad(format!("tags[{i}]"), "is empty"));
    }
    Ok(tags)
}

/// `POST /release_memory` (trtllm-serve's): frees engine memory by tag, after the requests in
/// flight finish; generation then answers 503 `sleeping` until /resume_memory.
#[utoipa::path(post, path = "/release_memory", tag = "Rollout control", request_body = Option<MemoryRequest>, responses((status = 200, description = "Released", body = ControlResponse), ControlErrors))]
pub async fn release_memory(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    memory_route(state, limit, req, true).await
}

/// `POST /resume_memory` (trtllm-serve's): takes released memory back; generation resumes
/// once no tag is released.
#[utoipa::path(post, path = "/resume_memory", tag = "Rollout control", request_body = Option<MemoryRequest>, responses((status = 200, description = "Resumed", body = ControlResponse), ControlErrors))]
pub async fn resume_memory(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    memory_route(state, limit, req, false).await
}

/// The two memory routes: the same body and checks, released or resumed.
async fn memory_route(
    state: AppState,
    limit: RlPayloadLimit,
    req: Request,
    release: bool,
) -> Reply {
    let control = state.infer.control().clone();
    let body: MemoryRequest = read_json(req, limit.0).await?;
    let what = if release {
        "release memory"
    } else {
        "resume memory"
    };
    let tags = memory_tags(&control, body.tags, what)?;
    let outcome = detached(async move {
        if release {
            control.release_memory(tags).await
        } else {
            control.resume_memory(tags).await
        }
    })
    .await?;
    let done = if release {
        "memory released"
    } else {
        "memory resumed"
    };
    Ok(Json(memory_answer(outcome, done)))
}

/// `POST /update_weights` (trtllm-serve's): one bucket of CUDA IPC handles per call, then
/// `{"weights": null}` to finish. From the first bucket to the finishing call, generation is
/// held (the model holds a mix of weights: tensorrt_llm/llmapi/rlhf_utils.py says a
/// multi-bucket sweep is not engine-atomic).
#[utoipa::path(post, path = "/update_weights", tag = "Rollout control", request_body = Option<UpdateWeightsRequest>, responses((status = 200, description = "Bucket loaded, or update finished", body = ControlResponse), ControlErrors))]
pub async fn update_weights(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    let control = state.infer.control().clone();
    let can = control.features().update_from_cuda_ipc;
    require(&control, can, "update weights from CUDA IPC handles")?;
    let body: UpdateWeightsRequest = read_json(req, limit.0).await?;
    let request = match body.weights {
        None => pb::UpdateWeightsRequest {
            source: Some(Source::Finalize(true)),
            weight_version: weight_version(body.weight_version)?,
            flush_cache: true,
        },
        Some(weights) => {
            if body.weight_version.is_some() {
                return Err(bad(
                    "weight_version",
                    "takes effect with the finishing {\"weights\": null} call: send it there",
                ));
            }
            if weights.is_empty() {
                return Err(bad(
                    "weights",
                    "must map at least one GPU UUID to its handles, or be null to finish the update",
                ));
            }
            let mut handles_by_gpu = std::collections::HashMap::with_capacity(weights.len());
            for (gpu, handles) in weights {
                if gpu.trim().is_empty() {
                    return Err(bad("weights", "a GPU UUID is empty"));
                }
                if handles.0.is_empty() {
                    return Err(bad(format!("weights.{gpu}"), "holds no handles"));
                }
                handles_by_gpu.insert(gpu, handles.0);
            }
            pb::UpdateWeightsRequest {
                source: Some(Source::CudaIpc(pb::CudaIpcWeights { handles_by_gpu })),
                weight_version: String::new(),
                flush_cache: false,
            }
        }
    };
    let aborting = body.abort_all_requests;
    let outcome = detached(async move { control.update_weights(request, aborting).await }).await?;
    Ok(Json(trtllm(update_answer(outcome, aborting))))
}

/// `POST /update_weights_from_disk` (SGLang's): loads a checkpoint directory on the server.
#[utoipa::path(post, path = "/update_weights_from_disk", tag = "Rollout control", request_body = UpdateFromDiskRequest, responses((status = 200, description = "Updated", body = ControlResponse), ControlErrors))]
pub async fn update_weights_from_disk(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    let control = state.infer.control().clone();
    let can = control.features().update_from_disk;
    require(&control, can, "update weights from disk")?;
    let body: UpdateFromDiskRequest = read_json(req, limit.0).await?;
    if body.model_path.trim().is_empty() {
        return Err(bad("model_path", "must name a checkpoint directory"));
    }
    if let Some(f) = body.load_format.as_deref().filter(|f| *f != "auto") {
        return Err(bad(
            "load_format",
            format!("{f:?} is not served; leave it out (or \"auto\"): the checkpoint's own format is read"),
        ));
    }
    let request = pb::UpdateWeightsRequest {
        source: Some(Source::ModelPath(body.model_path)),
        weight_version: weight_version(body.weight_version)?,
        flush_cache: body.flush_cache,
    };
    let aborting = body.abort_all_requests;
    let outcome = detached(async move { control.update_weights(request, aborting).await }).await?;
    Ok(Json(update_answer(outcome, aborting)))
}

/// `POST /update_weights_from_tensor` (SGLang's): named tensors in the body.
#[utoipa::path(post, path = "/update_weights_from_tensor", tag = "Rollout control", request_body = UpdateFromTensorRequest, responses((status = 200, description = "Updated", body = ControlResponse), ControlErrors))]
pub async fn update_weights_from_tensor(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    let control = state.infer.control().clone();
    let can = control.features().update_from_tensors;
    require(&control, can, "update weights from serialized tensors")?;
    let body: UpdateFromTensorRequest = read_json(req, limit.0).await?;
    let format = match body.load_format.as_deref() {
        None | Some("safetensors") => "safetensors",
        Some("pickle") => "pickle",
        Some(other) => {
            return Err(bad(
                "load_format",
                format!("{other:?} is not served; use \"safetensors\" (default) or \"pickle\""),
            ))
        }
    };
    if body.serialized_named_tensors.is_empty() {
        return Err(bad(
            "serialized_named_tensors",
            "must hold at least one payload",
        ));
    }
    let mut payloads = Vec::with_capacity(body.serialized_named_tensors.len());
    for (i, p) in body.serialized_named_tensors.into_iter().enumerate() {
        if p.0.is_empty() {
            return Err(bad(format!("serialized_named_tensors[{i}]"), "is empty"));
        }
        payloads.push(p.0);
    }
    let request = pb::UpdateWeightsRequest {
        source: Some(Source::Tensors(pb::SerializedTensors {
            format: format.into(),
            payloads,
        })),
        weight_version: weight_version(body.weight_version)?,
        flush_cache: body.flush_cache,
    };
    let aborting = body.abort_all_requests;
    let outcome = detached(async move { control.update_weights(request, aborting).await }).await?;
    Ok(Json(update_answer(outcome, aborting)))
}

/// `POST /flush_cache` (SGLang's): drops every cached prefix, after the requests in flight
/// finish.
#[utoipa::path(post, path = "/flush_cache", tag = "Rollout control", request_body = Option<EmptyRequest>, responses((status = 200, description = "Flushed", body = ControlResponse), ControlErrors))]
pub async fn flush_cache(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    let control = state.infer.control().clone();
    let can = control.features().flush_cache;
    require(&control, can, "flush its prefix cache")?;
    let _: EmptyRequest = read_json(req, limit.0).await?;
    let outcome = detached(async move { control.flush_cache().await }).await?;
    Ok(Json(answer(outcome, "cache flushed")))
}

/// `POST /pause_generation` (SGLang's): new requests wait until /continue_generation; those
/// in flight are aborted (mode `abort`) or kept, paused, in the engine (mode `in_place`).
#[utoipa::path(post, path = "/pause_generation", tag = "Rollout control", request_body = Option<PauseRequest>, responses((status = 200, description = "Paused", body = ControlResponse), ControlErrors))]
pub async fn pause_generation(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    let control = state.infer.control().clone();
    let body: PauseRequest = read_json(req, limit.0).await?;
    let mode = match body.mode.as_deref() {
        None | Some("abort") => PauseMode::Abort,
        Some("in_place") => {
            let can = control.features().pause_in_place;
            require(&control, can, "pause generation in place")?;
            PauseMode::InPlace
        }
        Some(other) => {
            return Err(bad(
                "mode",
                format!("{other:?} is not served; use \"abort\" (default) or \"in_place\""),
            ))
        }
    };
    let outcome = detached(async move { control.pause(mode).await }).await?;
    let aborted = outcome.aborted;
    let mut r = answer(outcome, "generation paused");
    r.num_aborted_requests = (mode == PauseMode::Abort).then_some(aborted);
    Ok(Json(r))
}

/// `POST /continue_generation` (SGLang's): ends a pause; waiting requests go.
#[utoipa::path(post, path = "/continue_generation", tag = "Rollout control", request_body = Option<EmptyRequest>, responses((status = 200, description = "Continued", body = ControlResponse), ControlErrors))]
pub async fn continue_generation(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    let control = state.infer.control().clone();
    let _: EmptyRequest = read_json(req, limit.0).await?;
    let outcome = detached(async move { control.continue_generation().await }).await?;
    Ok(Json(answer(outcome, "generation continued")))
}

/// `POST /abort_request` (SGLang's): `{"rid": "<x-request-id>"}` ends that request (404 if
/// none is queued or running under it), `{"abort_all": true}` every one. Their clients get an
/// `aborted` error (a stream: an error event).
#[utoipa::path(post, path = "/abort_request", tag = "Rollout control", request_body = AbortRequest, responses((status = 200, description = "Aborted", body = ControlResponse), ControlErrors))]
pub async fn abort_request(
    State(state): State<AppState>,
    Extension(limit): Extension<RlPayloadLimit>,
    req: Request,
) -> Reply {
    let control = state.infer.control().clone();
    let body: AbortRequest = read_json(req, limit.0).await?;
    let rid = body.rid.filter(|r| !r.is_empty());
    let outcome = match (rid, body.abort_all) {
        (Some(rid), false) => {
            let id = RequestId(rid.into());
            detached(async move { control.abort_request(&id).await }).await?
        }
        (None, true) => detached(async move { Ok(control.abort_all().await) }).await?,
        (Some(_), true) => {
            return Err(bad(
                "abort_all",
                "give either `rid` or `abort_all: true`, not both",
            ))
        }
        (None, false) => {
            return Err(bad(
                "rid",
                "name a request by its x-request-id, or send `abort_all: true`",
            ))
        }
    };
    let aborted = outcome.aborted;
    let mut r = answer(outcome, "aborted");
    r.num_aborted_requests = Some(aborted);
    Ok(Json(r))
}

/// `GET /get_weight_version` (SGLang's): the label of the weights loaded now.
#[utoipa::path(get, path = "/get_weight_version", tag = "Rollout control", responses((status = 200, description = "The current weight_version", body = WeightVersion), ControlErrors))]
pub async fn get_weight_version(State(state): State<AppState>) -> Json<WeightVersion> {
    Json(WeightVersion {
        weight_version: state.infer.control().weight_version(),
    })
}
