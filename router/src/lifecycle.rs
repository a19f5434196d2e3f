//! Graceful shutdown: on SIGTERM/SIGINT new requests get 503 while those in flight get
//! --shutdown-timeout to finish; then the server stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::errors::RouterError;
use crate::infer::Infer;
use crate::server::error_response;

#[derive(Clone, Default)]
pub struct Lifecycle {
    draining: Arc<AtomicBool>,
}

impl Lifecycle {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

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

/// Waits for a stop signal, then drains: returns once nothing is in flight or `timeout`
/// has passed.
pub async fn drain_on_signal(lifecycle: Lifecycle, infer: Arc<Infer>, timeout: Duration) {
    stop_signal().await;
    lifecycle.start_draining();
    let start = Instant::now();
    tracing::info!(
        in_flight = infer.in_flight(),
        timeout_s = timeout.as_secs(),
        "draining: new requests get 503"
    );
    while infer.in_flight() > 0 && start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = infer.in_flight();
    if left > 0 {
        tracing::warn!(
            in_flight = left,
            "shutdown timeout reached; closing with requests in flight"
        );
    } else {
        tracing::info!("drained");
    }
}

async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
