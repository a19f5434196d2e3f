//! Optional API key: `Authorization: Bearer KEY` on every route but `/health`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::errors::{error_response, RouterError};

/// Paths that answer without a key: load balancers probe health without credentials.
const OPEN_PATHS: &[&str] = &["/health", "/health_generate"];

#[derive(Clone)]
pub struct ApiKey(pub Arc<Vec<u8>>);

impl ApiKey {
    /// Constant-time in the key's content (only its length can leak).
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_slice().ct_eq(presented).into()
    }
}

/// The token of an `Authorization: Bearer` header, if there is one.
pub(crate) fn bearer(req: &Request) -> Option<&[u8]> {
    let value = req.headers().get(AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value[7..].trim_ascii())
}

pub async fn require_api_key(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if OPEN_PATHS.contains(&path) || req.method() == axum::http::Method::OPTIONS {
        return next.run(req).await;
    }
    match bearer(&req) {
        Some(k) if key.matches(k) => next.run(req).await,
        Some(_) => error_response(
            path,
            RouterError::Unauthorized("the API key is not valid".into()),
        ),
        None => error_response(
            path,
            RouterError::Unauthorized(
                "this server requires an API key: send `Authorization: Bearer <key>`".into(),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_exact_key() {
        let key = ApiKey(Arc::new(b"s3cret".to_vec()));
        assert!(key.matches(b"s3cret"));
        assert!(!key.matches(b"s3creT"));
        assert!(!key.matches(b"s3cret "));
        assert!(!key.matches(b""));
    }

    #[test]
    fn bearer_parsing() {
        let req = |v: &str| {
            Request::builder()
                .header(AUTHORIZATION, v)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        assert_eq!(bearer(&req("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&req("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&req("Basic abc")), None);
        assert_eq!(bearer(&req("Bear")), None);
    }
}
