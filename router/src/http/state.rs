//! What every handler shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::generation::infer::Infer;
use crate::http::tgi::schemas::Info;
use crate::lifecycle::Lifecycle;

#[derive(Clone)]
pub struct AppState {
    pub infer: Arc<Infer>,
    pub info: Arc<Info>,
    pub metrics: PrometheusHandle,
    pub lifecycle: Lifecycle,
    /// When the router loaded the model (Unix seconds): `created` of /v1/models.
    pub created: u64,
}
