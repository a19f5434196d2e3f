//! tensorgate router: HTTP in front, gRPC to the executor behind.
//!
//! `src/` follows the request's path: `http` (routes, schemas, SSE, auth, OpenAPI) →
//! `generation` (validation, tokenization, templates, detokenization, stop sequences) →
//! `executors` (the gRPC client and the admission scheduler). `app` wires them at startup.

pub mod app;
pub mod config;
pub mod errors;
pub mod executors;
pub mod generation;
pub mod http;
pub mod lifecycle;
pub mod metrics;
#[cfg(feature = "python")]
mod python;

pub mod pb {
    tonic::include_proto!("tensorgate.v1");
}

pub use app::run_main;
