//! Typed router errors and their one mapping to HTTP.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::validation::ValidationError;

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
}

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::Validation(_) | RouterError::Tokenizer(_) | RouterError::Template(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            RouterError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            RouterError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RouterError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::Generation(_) => StatusCode::FAILED_DEPENDENCY,
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
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        (status, Json(self.body())).into_response()
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
        let kind = match self.status().as_u16() {
            400..=499 => "invalid_request_error",
            _ => "server_error",
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
            ValidationError::Admission(_) => "max_new_tokens",
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

impl From<crate::validation::ValidationError> for OpenAiError {
    fn from(e: crate::validation::ValidationError) -> Self {
        OpenAiError(RouterError::Validation(e))
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "request failed");
        }
        (status, Json(self.0.openai_body())).into_response()
    }
}
