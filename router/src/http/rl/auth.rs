//! The rollout-control key: `Authorization: Bearer <rl-control-key>` on every control route.
//! Never the --api-key: a client allowed to generate is not thereby allowed to replace the
//! weights or stop the engine.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::errors::RouterError;
use crate::http::auth::{bearer, ApiKey};

#[derive(Clone)]
pub struct ControlKey(pub ApiKey);

impl ControlKey {
    pub fn new(key: &str) -> Self {
        Self(ApiKey(Arc::new(key.as_bytes().to_vec())))
    }
}

pub async fn require_control_key(
    State(key): State<ControlKey>,
    req: Request,
    next: Next,
) -> Response {
    match bearer(&req) {
        // Constant-time in the key's content (ApiKey::matches).
        Some(k) if key.0.matches(k) => next.run(req).await,
        Some(_) => {
            RouterError::Unauthorized("the rollout-control key is not valid".into()).into_response()
        }
        None => RouterError::Unauthorized(
            "the rollout-control routes require the control key: send `Authorization: Bearer \
             <rl-control-key>`"
                .into(),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header::AUTHORIZATION, StatusCode};
    use axum::routing::post;
    use tower::ServiceExt;

    async fn status(key: Option<&str>) -> (StatusCode, String) {
        let app = axum::Router::new()
            .route("/flush_cache", post(|| async { "ok" }))
            .route_layer(axum::middleware::from_fn_with_state(
                ControlKey::new("ctl-key"),
                require_control_key,
            ));
        let mut req = Request::builder().method("POST").uri("/flush_cache");
        if let Some(k) = key {
            req = req.header(AUTHORIZATION, k);
        }
        let r = app
            .oneshot(req.body(axum::body::Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = r.status();
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn only_the_control_key_opens_the_routes() {
        assert_eq!(status(Some("Bearer ctl-key")).await.0, StatusCode::OK);
        for wrong in [
            "Bearer ctl-keyx",
            "Bearer api-key",
            "ctl-key",
            "Basic ctl-key",
        ] {
            let (s, body) = status(Some(wrong)).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{wrong}");
            assert!(body.contains("authentication"), "{body}");
        }
        let (s, body) = status(None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(body.contains("Bearer <rl-control-key>"), "{body}");
    }
}
