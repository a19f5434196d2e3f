//! Typed router errors and their one mapping to HTTP (status, both bodies, log level).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::generation::validation::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("Model is overloaded: {0}")]
    Overloaded(String),
    #[error("Executor unavailable: {0}")]
    Unavailable(String),
    #[error("Request failed during generation: {0}")]
    Generation(String),
    #[error("Tokenizer error: {0}")]
    Tokenizer(String),
    #[error("Template error: {0}")]
    Template(String),
    #[error("Unauthorized: {0}")]
    Unauthorized(String),
    /// A control payload field that is malformed (bad base64, wrong type, unknown field).
    #[error("`{field}` is invalid: {reason}")]
    BadPayload { field: String, reason: String },
    /// The executor refused a control payload (INVALID_ARGUMENT): its message names the
    /// tensor or field, and nothing was changed.
    #[error("The executor refused the request: {0}")]
    Rejected(String),
    #[error("Request body too large: {0}")]
    PayloadTooLarge(String),
    #[error("Unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("Not found: {0}")]
    NotFound(String),
    /// The server's state forbids the operation now (FAILED_PRECONDITION, or a pause in the way).
    #[error("Conflict: {0}")]
    Conflict(String),
    /// The engine cannot do it (gRPC UNIMPLEMENTED); the message names the engine.
    #[error("Not implemented: {0}")]
    NotImplemented(String),
    /// Engine memory is released (/release_memory): generation waits for /resume_memory.
    #[error("The engine is sleeping: {0}")]
    Sleeping(String),
    /// Ended by the control plane (/abort_request, /pause_generation, an update with
    /// abort_all_requests).
    #[error("Request aborted: {0}")]
    Aborted(String),
    /// A control operation failed inside the executor for a reason that is not the caller's.
    #[error("Control operation failed: {0}")]
    ControlFailed(String),
}

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::Validation(_)
            | RouterError::Tokenizer(_)
            | RouterError::Template(_)
            | RouterError::BadPayload { .. }
            | RouterError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RouterError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            RouterError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RouterError::Unavailable(_) | RouterError::Sleeping(_) | RouterError::Aborted(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RouterError::Generation(_) => StatusCode::FAILED_DEPENDENCY,
            RouterError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RouterError::NotFound(_) => StatusCode::NOT_FOUND,
            RouterError::Conflict(_) => StatusCode::CONFLICT,
            RouterError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            RouterError::ControlFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            RouterError::Validation(_) => "validation",
            RouterError::Tokenizer(_) => "tokenizer",
            RouterError::Template(_) => "template_error",
            RouterError::Overloaded(_) => "overloaded",
            RouterError::Unavailable(_) => "unavailable",
            RouterError::Generation(_) => "generation",
            RouterError::Unauthorized(_) => "authentication",
            RouterError::BadPayload { .. } | RouterError::Rejected(_) => "validation",
            RouterError::PayloadTooLarge(_) => "payload_too_large",
            RouterError::UnsupportedMediaType(_) => "unsupported_media_type",
            RouterError::NotFound(_) => "not_found",
            RouterError::Conflict(_) => "conflict",
            RouterError::NotImplemented(_) => "not_implemented",
            RouterError::Sleeping(_) => "sleeping",
            RouterError::Aborted(_) => "aborted",
            RouterError::ControlFailed(_) => "control_failed",
        }
    }

    /// Whether the client caused it (bad input, wrong key, too many requests): those are not
    /// logged as failures. A failed generation (424) or a missing executor (503) is ours.
    pub fn is_client_fault(&self) -> bool {
        match self {
            RouterError::Validation(_)
            | RouterError::Tokenizer(_)
            | RouterError::Template(_)
            | RouterError::Unauthorized(_)
            | RouterError::Overloaded(_)
            | RouterError::BadPayload { .. }
            | RouterError::Rejected(_)
            | RouterError::PayloadTooLarge(_)
            | RouterError::UnsupportedMediaType(_)
            | RouterError::NotFound(_)
            | RouterError::Conflict(_) => true,
            RouterError::Unavailable(_)
            | RouterError::Generation(_)
            | RouterError::NotImplemented(_)
            | RouterError::Sleeping(_)
            | RouterError::Aborted(_)
            | RouterError::ControlFailed(_) => false,
        }
    }

    /// Logs a failure that is not the client's at warn level, once, where it is answered.
    /// A sleeping engine and an operator's abort are states the operator chose, not failures.
    pub fn log(&self) {
        let chosen = matches!(self, RouterError::Sleeping(_) | RouterError::Aborted(_));
        if !self.is_client_fault() && !chosen {
            tracing::warn!(error = %self, status = self.status().as_u16(), "request failed");
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            error_type: self.error_type().to_string(),
        }
    }
}

/// TGI's error shape.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub error_type: String,
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        self.log();
        (self.status(), Json(self.body())).into_response()
    }
}

/// OpenAI's error object, used on the /v1 routes.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl OpenAiErrorBody {
    pub fn new(message: String, kind: &str, code: &str) -> Self {
        Self {
            error: OpenAiErrorDetail {
                message,
                kind: kind.to_string(),
                param: None,
                code: Some(code.to_string()),
            },
        }
    }
}

impl RouterError {
    pub fn openai_body(&self) -> OpenAiErrorBody {
        let kind = if self.is_client_fault() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        // One validator serves both families; OpenAI clients know their own field names.
        let mut message = self.to_string();
        for (tgi, openai) in OPENAI_NAMES {
            message = message.replace(&format!("`{tgi}`"), &format!("`{openai}`"));
        }
        let mut body = OpenAiErrorBody::new(message, kind, self.error_type());
        body.error.param = self.param().map(|p| {
            OPENAI_NAMES
                .iter()
                .find(|(tgi, _)| *tgi == p)
                .map_or(p, |(_, o)| o)
                .to_string()
        });
        body
    }

    /// The request field the error is about, where there is one.
    fn param(&self) -> Option<&'static str> {
        let RouterError::Validation(v) = self else {
            return None;
        };
        Some(match v {
            ValidationError::EmptyInput | ValidationError::InputLength { .. } => "inputs",
            ValidationError::NotPositive(name, _)
            | ValidationError::NotFinite { name, .. }
            | ValidationError::OutOfRange { name, .. }
            | ValidationError::Unsupported(name, _) => name,
            ValidationError::TotalLength { .. } => "max_new_tokens",
            ValidationError::Truncate { .. } => "truncate",
            ValidationError::StopSequences { .. } | ValidationError::StopSequenceLength { .. } => {
                "stop"
            }
            ValidationError::TopNTokens { .. } => "top_n_tokens",
            ValidationError::Grammar { field, .. }
            | ValidationError::TokenId { field, .. }
            | ValidationError::Invalid { field, .. } => field,
            ValidationError::Admission(_) => "max_new_tokens",
            ValidationError::BestOf { .. }
            | ValidationError::BestOfDisabled
            | ValidationError::BestOfSampling
            | ValidationError::BestOfStream => "best_of",
            ValidationError::BestOfSeed => "seed",
            ValidationError::PrefillDetailsStream => "decoder_input_details",
        })
    }
}

/// TGI parameter names as OpenAI clients call them.
const OPENAI_NAMES: &[(&str, &str)] = &[
    ("max_new_tokens", "max_tokens"),
    ("inputs", "prompt"),
    ("top_n_tokens", "top_logprobs"),
];

/// A RouterError answered in OpenAI's shape.
pub struct OpenAiError(pub RouterError);

impl From<RouterError> for OpenAiError {
    fn from(e: RouterError) -> Self {
        OpenAiError(e)
    }
}

impl From<ValidationError> for OpenAiError {
    fn from(e: ValidationError) -> Self {
        OpenAiError(RouterError::Validation(e))
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.log();
        (self.0.status(), Json(self.0.openai_body())).into_response()
    }
}

/// An error in the shape of the route it answers: OpenAI's under /v1, TGI's elsewhere.
pub fn error_response(path: &str, e: RouterError) -> Response {
    if path.starts_with("/v1/") {
        OpenAiError(e).into_response()
    } else {
        e.into_response()
    }
}

/// Why the router could not start; printed once and the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(String),
    #[error("cannot load the tokenizer: {0}")]
    Tokenizer(String),
    #[error("cannot load the chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Executor(String),
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn openai_json(e: RouterError) -> (StatusCode, serde_json::Value) {
        let r = error_response("/v1/completions", e);
        let status = r.status();
        let bytes = r.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).expect("json"))
    }

    #[tokio::test]
    async fn a_failed_generation_is_a_server_error_on_v1() {
        let (status, body) = openai_json(RouterError::Generation("the engine failed".into())).await;
        assert_eq!(status, StatusCode::FAILED_DEPENDENCY);
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["code"], "generation");
    }

    #[tokio::test]
    async fn client_faults_are_invalid_requests_on_v1() {
        for e in [
            RouterError::Validation(ValidationError::EmptyInput),
            RouterError::Overloaded("full".into()),
            RouterError::Unauthorized("no key".into()),
        ] {
            let (_, body) = openai_json(e).await;
            assert_eq!(body["error"]["type"], "invalid_request_error");
        }
        let (status, body) = openai_json(RouterError::Unavailable("gone".into())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["type"], "server_error");
    }

    #[test]
    fn only_our_failures_are_logged() {
        assert!(!RouterError::Generation("x".into()).is_client_fault());
        assert!(!RouterError::Unavailable("x".into()).is_client_fault());
        assert!(RouterError::Validation(ValidationError::EmptyInput).is_client_fault());
    }

    #[test]
    fn tgi_paths_keep_tgi_shape() {
        let r = error_response("/generate", RouterError::Generation("boom".into()));
        assert_eq!(r.status(), StatusCode::FAILED_DEPENDENCY);
    }
}
