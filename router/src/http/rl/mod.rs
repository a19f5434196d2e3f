//! The rollout-control routes (docs/api.md, "Rollout control"): registered only with
//! --enable-rl-control, guarded by their own key, with their own body limit.

pub mod auth;
pub mod handlers;
pub mod openapi;
pub mod payload;
pub mod schemas;

use axum::routing::{get, post};
use axum::{middleware, Extension, Router};

use crate::config::RlControl;
use crate::http::drain;
use crate::http::state::AppState;

/// The control routes, ready to merge into the app (their auth and body limit inside).
pub fn router(state: AppState, rl: &RlControl) -> Router {
    let lifecycle = state.lifecycle.clone();
    Router::new()
        .route("/release_memory", post(handlers::release_memory))
        .route("/resume_memory", post(handlers::resume_memory))
        .route("/update_weights", post(handlers::update_weights))
        .route(
            "/update_weights_from_disk",
            post(handlers::update_weights_from_disk),
        )
        .route(
            "/update_weights_from_tensor",
            post(handlers::update_weights_from_tensor),
        )
        .route("/flush_cache", post(handlers::flush_cache))
        .route("/pause_generation", post(handlers::pause_generation))
        .route("/continue_generation", post(handlers::continue_generation))
        .route("/abort_request", post(handlers::abort_request))
        .route("/get_weight_version", get(handlers::get_weight_version))
        .layer(Extension(payload::RlPayloadLimit(rl.max_payload_bytes)))
        .with_state(state)
        .route_layer(middleware::from_fn_with_state(
            lifecycle,
            drain::refuse_when_draining,
        ))
        .route_layer(middleware::from_fn_with_state(
            auth::ControlKey::new(&rl.key),
            auth::require_control_key,
        ))
}
