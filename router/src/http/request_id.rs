//! `x-request-id` on the generation routes: the client's own (checked) or one the router
//! makes, handed to the handler and echoed on every answer, refusals included. It is the
//! `rid` that /abort_request names.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::errors::{error_response, RouterError};
use crate::generation::requests::RequestId;
use crate::generation::validation::ValidationError;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id accepted.
pub const MAX_LEN: usize = 128;

/// A client's id: 1 to 128 characters of `A-Z a-z 0-9 - _ . :` (UUIDs, hex, and the like),
/// safe to log and to echo.
fn parse(value: &HeaderValue) -> Result<RequestId, ValidationError> {
    let bytes = value.as_bytes();
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
    if bytes.is_empty() || bytes.len() > MAX_LEN || !bytes.iter().all(allowed) {
        return Err(ValidationError::Invalid {
            field: "x-request-id",
            reason: format!(
                "must be 1 to {MAX_LEN} characters of A-Z a-z 0-9 - _ . : (got {} bytes)",
                bytes.len()
            ),
        });
    }
    // All ASCII, checked above.
    let text = String::from_utf8_lossy(bytes);
    Ok(RequestId(Arc::from(text.as_ref())))
}

/// The routes whose answers carry the header (the OpenAPI document lists them too).
pub const GENERATION_PATHS: [&str; 5] = [
    "/",
    "/generate",
    "/generate_stream",
    "/v1/completions",
    "/v1/chat/completions",
];

pub async fn assign(mut req: Request, next: Next) -> Response {
    if !GENERATION_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let (id, mut response) = match req.headers().get(&HEADER).map(parse) {
        Some(Err(e)) => {
            // Refused, and answered under an id of the router's like any other answer.
            let refusal = error_response(req.uri().path(), RouterError::Validation(e));
            (RequestId::generate(), refusal)
        }
        given => {
            let id = given
                .and_then(Result::ok)
                .unwrap_or_else(RequestId::generate);
            req.extensions_mut().insert(id.clone());
            (id, next.run(req).await)
        }
    };
    if let Ok(value) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_in_length_and_charset() {
        for good in ["a", "0f8fad5b-d9cb-469f-a165-70867728950e", "run.7:step_3"] {
            let id = parse(&HeaderValue::from_static(good)).expect(good);
            assert_eq!(&*id.0, good);
        }
        let long = "x".repeat(MAX_LEN + 1);
        for bad in ["", "a b", "a/b", "é", long.as_str()] {
            let value = HeaderValue::from_bytes(bad.as_bytes()).expect("header value");
            let e = parse(&value).expect_err(bad);
            assert!(e.to_string().contains("`x-request-id`"), "{e}");
        }
        assert_eq!(RequestId::generate().0.len(), 32);
    }
}
