//! While the server drains, every route but /metrics answers 503.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::errors::{error_response, RouterError};
use crate::lifecycle::Lifecycle;

/// While draining, every route but /metrics answers 503 (so /health tells load balancers).
pub async fn refuse_when_draining(
    State(lifecycle): State<Lifecycle>,
    req: Request,
    next: Next,
) -> Response {
    if lifecycle.is_draining() && req.uri().path() != "/metrics" {
        return error_response(
            req.uri().path(),
            RouterError::Unavailable(
                "the server is shutting down and takes no new requests".into(),
            ),
        );
    }
    next.run(req).await
}
