//! JSON body extractors whose rejections use the route family's error shape (TGI's on the
//! TGI routes, OpenAI's on /v1) instead of axum's plain text.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::errors::{ErrorBody, OpenAiErrorBody};

/// Status and message for a rejected body; 413 names the flag that sets the limit.
fn describe(rejection: JsonRejection) -> (StatusCode, String) {
    let status = match rejection.status() {
        // Syntax and schema errors alike are "unprocessable" for TGI clients.
        StatusCode::BAD_REQUEST => StatusCode::UNPROCESSABLE_ENTITY,
        s => s,
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "request body is larger than the limit set by --payload-limit".to_string()
        }
        _ => rejection.body_text(),
    };
    (status, message)
}

fn error_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "validation",
    }
}

pub struct TgiJson<T>(pub T);

pub struct TgiJsonError(StatusCode, String);

impl IntoResponse for TgiJsonError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.1,
            error_type: error_type(self.0).into(),
        };
        (self.0, Json(body)).into_response()
    }
}

impl<S, T> FromRequest<S> for TgiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = TgiJsonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(TgiJson(v)),
            Err(r) => {
                let (status, message) = describe(r);
                Err(TgiJsonError(status, message))
            }
        }
    }
}

pub struct OpenAiJson<T>(pub T);

pub struct OpenAiJsonError(StatusCode, String);

impl IntoResponse for OpenAiJsonError {
    fn into_response(self) -> Response {
        let body = OpenAiErrorBody::new(self.1, "invalid_request_error", error_type(self.0));
        (self.0, Json(body)).into_response()
    }
}

impl<S, T> FromRequest<S> for OpenAiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = OpenAiJsonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(OpenAiJson(v)),
            Err(r) => {
                let (status, message) = describe(r);
                Err(OpenAiJsonError(status, message))
            }
        }
    }
}
