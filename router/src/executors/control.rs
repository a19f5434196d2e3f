//! The executors' rollout-control RPCs (ReleaseMemory, ResumeMemory, UpdateWeights,
//! FlushCache, PauseGeneration, ContinueGeneration), each on connections whose message
//! limits match the control routes' body limit, and their gRPC statuses as router errors.
//! A call goes to every connected worker of the pool at once (one weight version, one memory
//! state across the fleet); it succeeds when all of them do.

use tonic::{Code, Status};

use crate::errors::RouterError;
use crate::executors::endpoint::Client;
use crate::executors::pool::ExecutorHandle;
use crate::pb;

/// Calls the control RPCs of the pool's executors.
#[derive(Clone)]
pub struct ControlRpc {
    executor: ExecutorHandle,
    /// The gRPC message limit of these calls: the decoded payload of a control body is never
    /// larger than the body, and a little room is left for the message's own framing.
    max_message_bytes: usize,
    /// The engine's name, for "cannot" answers (501).
    engine: String,
}

/// Room for protobuf framing (field tags, map keys) around a payload as large as the body.
const FRAMING_ROOM: usize = 1 << 20;

impl ControlRpc {
    pub fn new(executor: ExecutorHandle, max_payload_bytes: usize, engine: String) -> Self {
        Self {
            executor,
            max_message_bytes: max_payload_bytes.saturating_add(FRAMING_ROOM),
            engine,
        }
    }

    pub fn engine(&self) -> &str {
        &self.engine
    }

    /// One control RPC on every connected worker, on fresh control connections, concurrently.
    /// The first failure is the answer (naming the worker when there are several); otherwise
    /// the tensors written add up and the rest is the first worker's answer.
    async fn call<F, Fut>(&self, what: &str, rpc: F) -> Result<pb::ControlResponse, RouterError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<pb::ControlResponse>, Status>>,
    {
        let clients = self
            .executor
            .control_clients(self.max_message_bytes)
            .await
            .map_err(|e| RouterError::Unavailable(format!("cannot reach the executor: {e}")))?;
        let several = clients.len() > 1;
        let calls = clients.into_iter().map(|(name, client)| {
            let call = rpc(client);
            async move { (name, call.await) }
        });
        let mut merged: Option<pb::ControlResponse> = None;
        for (name, result) in futures::future::join_all(calls).await {
            let response = result.map(tonic::Response::into_inner).map_err(|status| {
                if several {
                    let named = Status::new(status.code(), format!("{name}: {}", status.message()));
                    status_error(&self.engine, what, &named)
                } else {
                    status_error(&self.engine, what, &status)
                }
            })?;
            match merged.as_mut() {
                Some(m) => m.tensors_updated += response.tensors_updated,
                None => merged = Some(response),
            }
        }
        merged.ok_or_else(|| RouterError::Unavailable("no executor is connected".into()))
    }

    pub async fn release_memory(
        &self,
        tags: Vec<String>,
    ) -> Result<pb::ControlResponse, RouterError> {
        let request = pb::MemoryRequest { tags };
        self.call("release memory", |mut c| {
            let request = request.clone();
            async move { c.release_memory(request).await }
        })
        .await
    }

    pub async fn resume_memory(
        &self,
        tags: Vec<String>,
    ) -> Result<pb::ControlResponse, RouterError> {
        let request = pb::MemoryRequest { tags };
        self.call("resume memory", |mut c| {
            let request = request.clone();
            async move { c.resume_memory(request).await }
        })
        .await
    }

    pub async fn update_weights(
        &self,
        request: pb::UpdateWeightsRequest,
    ) -> Result<pb::ControlResponse, RouterError> {
        self.call("update weights", |mut c| {
            let request = request.clone();
            async move { c.update_weights(request).await }
        })
        .await
    }

    pub async fn flush_cache(&self) -> Result<pb::ControlResponse, RouterError> {
        let request = pb::FlushCacheRequest {};
        self.call("flush its cache", |mut c| async move {
            c.flush_cache(request).await
        })
        .await
    }

    pub async fn pause_generation(&self) -> Result<pb::ControlResponse, RouterError> {
        let request = pb::PauseGenerationRequest {};
        self.call("pause generation in place", |mut c| async move {
            c.pause_generation(request).await
        })
        .await
    }

    pub async fn continue_generation(&self) -> Result<pb::ControlResponse, RouterError> {
        let request = pb::ContinueGenerationRequest {};
        self.call("continue generation", |mut c| async move {
            c.continue_generation(request).await
        })
        .await
    }
}

/// A control RPC's failure as the caller should see it: the contract's codes
/// (proto/tensorgate/v1/executor.proto, "Rollout control") each have their HTTP status.
pub fn status_error(engine: &str, what: &str, status: &Status) -> RouterError {
    let message = status.message();
    match status.code() {
        Code::Unimplemented => {
            RouterError::NotImplemented(format!("the {engine} engine cannot {what}: {message}"))
        }
        Code::InvalidArgument => RouterError::Rejected(message.to_string()),
        Code::FailedPrecondition => RouterError::Conflict(message.to_string()),
        Code::NotFound => RouterError::NotFound(message.to_string()),
        Code::ResourceExhausted => RouterError::PayloadTooLarge(format!(
            "the executor refused a message this large: {message}"
        )),
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted => {
            RouterError::Unavailable(format!("the executor could not {what}: {message}"))
        }
        _ => RouterError::ControlFailed(format!("the executor could not {what}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn contract_codes_map_to_their_statuses() {
        let cases = [
            (Code::Unimplemented, StatusCode::NOT_IMPLEMENTED),
            (Code::InvalidArgument, StatusCode::UNPROCESSABLE_ENTITY),
            (Code::FailedPrecondition, StatusCode::CONFLICT),
            (Code::NotFound, StatusCode::NOT_FOUND),
            (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE),
            (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        ];
        for (code, http) in cases {
            let e = status_error("trtllm", "update weights", &Status::new(code, "why"));
            assert_eq!(e.status(), http, "{code:?}");
            assert!(e.to_string().contains("why"), "{e}");
        }
        let e = status_error(
            "trtllm",
            "update weights",
            &Status::unimplemented("engine-dir weights are baked in"),
        );
        assert!(
            e.to_string()
                .contains("the trtllm engine cannot update weights"),
            "{e}"
        );
        let e = status_error(
            "transformers",
            "update weights",
            &Status::invalid_argument("`model.norm.weight`: shape [4] != [576]"),
        );
        assert!(e.to_string().contains("model.norm.weight"), "{e}");
    }
}
