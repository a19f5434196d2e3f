//! A control route's body, up to --rl-max-payload-bytes (weights: up to a GiB by default),
//! read as a JSON object. Parsing and base64 decoding run on the blocking pool, never on the
//! async threads; a bad body is refused naming its place (`weights.GPU-…`,
//! `serialized_named_tensors[3]`) and what is wrong there.

use axum::extract::Request;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use crate::errors::RouterError;

/// The body limit of the control routes (--rl-max-payload-bytes), in their extensions.
#[derive(Debug, Clone, Copy)]
pub struct RlPayloadLimit(pub usize);

fn too_large(limit: usize) -> RouterError {
    RouterError::PayloadTooLarge(format!(
        "the body is larger than {limit} bytes, the limit set by --rl-max-payload-bytes"
    ))
}

/// Reads the body into `T`. An empty body reads as `{}` (SGLang's body-less routes are posted
/// without one).
pub async fn read_json<T: DeserializeOwned + Send + 'static>(
    req: Request,
    limit: usize,
) -> Result<T, RouterError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let json_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(is_json);
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large(limit)
            } else {
                RouterError::BadPayload {
                    field: "body".into(),
                    reason: format!("could not be read: {e}"),
                }
            }
        })?
        .to_bytes();
    let empty = bytes.iter().all(u8::is_ascii_whitespace);
    if !empty && json_type != Some(true) {
        return Err(RouterError::UnsupportedMediaType(
            "a control body must be sent with `Content-Type: application/json`".into(),
        ));
    }
    tokio::task::spawn_blocking(move || parse::<T>(if empty { b"{}" } else { &bytes }))
        .await
        .map_err(|e| RouterError::ControlFailed(format!("reading the body failed: {e}")))?
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// A JSON object into `T`, errors naming where in the body they are.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RouterError> {
    // serde would read a struct from a JSON array of its fields in order; a body is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(RouterError::BadPayload {
            field: "body".into(),
            reason: "must be a JSON object".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = without_position(&inner);
        let field = if path == "." {
            // A missing field is named by serde's own message.
            "body".to_string()
        } else {
            path
        };
        RouterError::BadPayload { field, reason }
    })?;
    de.end().map_err(|e| RouterError::BadPayload {
        field: "body".into(),
        reason: without_position(&e),
    })?;
    Ok(value)
}

/// serde_json's message without " at line 1 column 123456789": the path says where.
fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match (e.classify(), message.rfind(" at line ")) {
        (serde_json::error::Category::Syntax | serde_json::error::Category::Eof, _) => message,
        (_, Some(at)) => message[..at].to_string(),
        (_, None) => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::rl::schemas::{MemoryRequest, UpdateFromTensorRequest, UpdateWeightsRequest};

    fn field_and_reason(e: RouterError) -> (String, String) {
        match e {
            RouterError::BadPayload { field, reason } => (field, reason),
            other => panic!("not a payload error: {other}"),
        }
    }

    #[test]
    fn errors_name_their_place_in_the_body() {
        let e =
            parse::<UpdateFromTensorRequest>(br#"{"serialized_named_tensors": ["aGk=", "!!"]}"#)
                .expect_err("bad base64");
        let (field, reason) = field_and_reason(e);
        assert_eq!(field, "serialized_named_tensors[1]");
        assert!(reason.contains("not valid base64"), "{reason}");

        let e = parse::<UpdateWeightsRequest>(br#"{"weights": {"GPU-a": "AA==", "GPU-b": 7}}"#)
            .expect_err("not a string");
        assert_eq!(field_and_reason(e).0, "weights.GPU-b");

        let e = parse::<UpdateWeightsRequest>(br#"{"weights": null, "abort": true}"#)
            .expect_err("unknown");
        let (field, reason) = field_and_reason(e);
        assert_eq!(field, "abort");
        assert!(reason.contains("unknown field `abort`"), "{reason}");

        let e = parse::<MemoryRequest>(br#"{"tags": ["model""#).expect_err("truncated");
        assert!(field_and_reason(e).1.contains("EOF"));

        let e = parse::<MemoryRequest>(br#"[["model"]]"#).expect_err("array");
        assert_eq!(field_and_reason(e).1, "must be a JSON object");

        let e = parse::<MemoryRequest>(br#"{"tags": []} {}"#).expect_err("trailing");
        assert!(field_and_reason(e).1.contains("trailing"));
    }

    #[tokio::test]
    async fn limits_and_content_type() {
        let req = |body: &'static str, ct: Option<&str>| {
            let mut b = Request::builder().method("POST").uri("/release_memory");
            if let Some(ct) = ct {
                b = b.header(CONTENT_TYPE, ct);
            }
            b.body(axum::body::Body::from(body)).expect("request")
        };
        let e =
            read_json::<MemoryRequest>(req(r#"{"tags": ["model"]}"#, Some("application/json")), 8)
                .await
                .expect_err("over the limit");
        assert_eq!(e.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.to_string().contains("--rl-max-payload-bytes"), "{e}");
        let e = read_json::<MemoryRequest>(req("{}", Some("text/plain")), 100)
            .await
            .expect_err("not json");
        assert_eq!(e.status(), axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let empty = read_json::<MemoryRequest>(req("", None), 100)
            .await
            .expect("an empty body is an empty object");
        assert!(empty.tags.is_none());
    }
}
