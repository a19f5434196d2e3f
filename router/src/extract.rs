//! JSON body extractor whose rejections use the TGI error shape instead of axum's plain text.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::errors::ErrorBody;

pub struct TgiJson<T>(pub T);

pub struct JsonError(StatusCode, String);

impl IntoResponse for JsonError {
    fn into_response(self) -> Response {
        let error_type = match self.0 {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "validation",
        };
        let body = ErrorBody {
            error: self.1,
            error_type: error_type.into(),
        };
        (self.0, Json(body)).into_response()
    }
}

impl<S, T> FromRequest<S> for TgiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = JsonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(TgiJson(v)),
            Err(rejection) => {
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
                Err(JsonError(status, message))
            }
        }
    }
}
