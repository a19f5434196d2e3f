//! JSON body extractors whose rejections use the route family's error shape (TGI's on the
//! TGI routes, OpenAI's on /v1) instead of axum's plain text.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::errors::{ErrorBody, OpenAiErrorBody};

/// serde lets a struct be written as a JSON array of its fields in order (`[1]` would read as
/// `{"best_of": 1}`); a public API must not, so bodies must be objects and struct-typed
/// fields go through these.
pub mod strict {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::value::MapAccessDeserializer;
    use serde::de::{MapAccess, Visitor};

    use super::*;

    /// Reads `T` from a JSON object only, straight from the input (not through a `Value`), so
    /// `T`'s own checks (types, duplicate and unknown keys) still apply.
    struct ObjectOnly<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOnly<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }

    struct Obj<T>(T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(ObjectOnly(PhantomData)).map(Obj)
        }
    }

    pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
        d.deserialize_map(ObjectOnly(PhantomData))
    }

    pub fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        Ok(Option::<Obj<T>>::deserialize(d)?.map(|o| o.0))
    }

    pub fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        Ok(Vec::<Obj<T>>::deserialize(d)?
            .into_iter()
            .map(|o| o.0)
            .collect())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct P {
            a: Option<i64>,
        }

        #[derive(Debug, Deserialize)]
        struct Outer {
            #[serde(deserialize_with = "object")]
            p: P,
            #[serde(default, deserialize_with = "objects")]
            ps: Vec<P>,
        }

        fn parse(s: &str) -> Result<Outer, String> {
            serde_json::from_str(s).map_err(|e| e.to_string())
        }

        #[test]
        fn objects_pass_and_arrays_do_not() {
            assert_eq!(parse(r#"{"p": {"a": 1}}"#).unwrap().p, P { a: Some(1) });
            assert!(parse(r#"{"p": [1]}"#)
                .unwrap_err()
                .contains("a JSON object"));
            assert!(parse(r#"{"p": {}, "ps": [[1]]}"#).is_err());
            assert_eq!(parse(r#"{"p": {}, "ps": [{"a": 2}]}"#).unwrap().ps.len(), 1);
        }

        #[test]
        fn inner_checks_still_apply() {
            assert!(parse(r#"{"p": {"a": 2.5}}"#).is_err());
            assert!(parse(r#"{"p": {"a": 1, "a": 2}}"#)
                .unwrap_err()
                .contains("duplicate"));
            assert!(parse(r#"{"p": {"b": 1}}"#)
                .unwrap_err()
                .contains("unknown field"));
        }
    }
}

/// The body limit in force (--payload-limit), put in each request's extensions by the router
/// so that a 413 can name it.
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimit(pub usize);

fn too_large(limit: Option<usize>) -> String {
    match limit {
        Some(n) => {
            format!("request body is larger than {n} bytes, the limit set by --payload-limit")
        }
        None => "request body is larger than the limit set by --payload-limit".to_string(),
    }
}

fn is_json(req: &Request) -> bool {
    let Some(value) = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
        _ => false,
    }
}

/// The body as a JSON object read into `T` straight from the bytes (so duplicate keys and
/// type errors are caught by `T`'s own deserializer): 415 without a JSON content type, 413
/// over the body limit, 422 for anything else wrong.
async fn object_body<S: Send + Sync, T: DeserializeOwned>(
    req: Request,
    state: &S,
    name_field: fn(&[u8]) -> Option<String>,
) -> Result<T, (StatusCode, String)> {
    if !is_json(&req) {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`".into(),
        ));
    }
    let limit = req.extensions().get::<PayloadLimit>().map(|l| l.0);
    let bytes = axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|r| {
            let status = r.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                (status, too_large(limit))
            } else {
                (status, r.body_text())
            }
        })?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "the request body must be a JSON object".into(),
        ));
    }
    Json::<T>::from_bytes(&bytes).map(|Json(v)| v).map_err(|r| {
        let (status, message) = describe(r, limit);
        match name_field(&bytes) {
            // In axum's words, as every other deserialization error reads.
            Some(named) if status == StatusCode::UNPROCESSABLE_ENTITY => (
                status,
                format!("Failed to deserialize the JSON body into the target type: {named}"),
            ),
            _ => (status, message),
        }
    })
}

/// Status and message for a rejected body; 413 names the flag that sets the limit.
fn describe(rejection: JsonRejection, limit: Option<usize>) -> (StatusCode, String) {
    let status = match rejection.status() {
        // Syntax and schema errors alike are "unprocessable" for TGI clients.
        StatusCode::BAD_REQUEST => StatusCode::UNPROCESSABLE_ENTITY,
        s => s,
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(limit),
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
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = TgiJsonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        object_body(req, state, |_| None)
            .await
            .map(TgiJson)
            .map_err(|(status, message)| TgiJsonError(status, message))
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
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = OpenAiJsonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        object_body(req, state, crate::http::openai::schemas::name_common_field)
            .await
            .map(OpenAiJson)
            .map_err(|(status, message)| OpenAiJsonError(status, message))
    }
}
