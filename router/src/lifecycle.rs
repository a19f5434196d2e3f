//! Graceful shutdown: on SIGTERM/SIGINT new requests get 503 while those in flight get
//! --shutdown-timeout to finish; then the server stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::generation::infer::Infer;

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

/// Waits for a stop signal, then drains: returns once nothing is in flight or `timeout`
/// has passed.
pub async fn drain_on_signal(lifecycle: Lifecycle, infer: Arc<Infer>, timeout: Duration) {
    stop_signal().await;
    lifecycle.start_draining();
    // What a rollout-control pause holds cannot go any more (the control routes are closed).
    infer.control().on_shutdown();
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
            "shutdown timeout reached; ending the requests still in flight with 503"
        );
        infer.fail_in_flight(&format!(
            "the server is shutting down and --shutdown-timeout ({} s) ran out before this \
             request finished",
            timeout.as_secs()
        ));
        // Give their streams a moment to send the error before the connections close.
        let grace = Instant::now();
        while infer.in_flight() > 0 && grace.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
