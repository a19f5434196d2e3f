//! `GET /v1/models`.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::http::responses::OpenAiAuthErrors;
use crate::http::state::AppState;

#[utoipa::path(get, path = "/v1/models", tag = "OpenAI", responses((status = 200, description = "The served model; `created` is when this server loaded it", body = Object), OpenAiAuthErrors))]
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.info.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "tensorgate",
        }]
    }))
}
