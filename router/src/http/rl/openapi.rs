//! The rollout-control part of the OpenAPI document, merged in only when the routes are on.

use utoipa::OpenApi;

use crate::http::rl::schemas::{
    AbortRequest, ControlResponse, EmptyRequest, MemoryRequest, PauseRequest,
    UpdateFromDiskRequest, UpdateFromTensorRequest, UpdateWeightsRequest, WeightVersion,
};

#[derive(OpenApi)]
#[openapi(
    paths(
        crate::http::rl::handlers::release_memory,
        crate::http::rl::handlers::resume_memory,
        crate::http::rl::handlers::update_weights,
        crate::http::rl::handlers::update_weights_from_disk,
        crate::http::rl::handlers::update_weights_from_tensor,
        crate::http::rl::handlers::flush_cache,
        crate::http::rl::handlers::pause_generation,
        crate::http::rl::handlers::continue_generation,
        crate::http::rl::handlers::abort_request,
        crate::http::rl::handlers::get_weight_version,
    ),
    components(schemas(
        MemoryRequest,
        UpdateWeightsRequest,
        UpdateFromDiskRequest,
        UpdateFromTensorRequest,
        PauseRequest,
        EmptyRequest,
        AbortRequest,
        ControlResponse,
        WeightVersion,
    )),
    tags((
        name = "Rollout control",
        description = "RL trainers: memory release and resume, weight updates, pause, abort \
                       (only with --enable-rl-control; `Authorization: Bearer <rl-control-key>`)"
    ))
)]
pub struct RlApiDoc;
