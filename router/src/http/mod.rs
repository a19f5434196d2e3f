//! The HTTP front: the route table, the middleware around it, and the two API families
//! (`tgi`, `openai`) with their schemas and streaming formats.

pub mod auth;
pub mod drain;
pub mod extract;
pub mod openai;
pub mod openapi;
pub mod request_id;
pub mod responses;
pub mod rl;
pub mod state;
pub mod tgi;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::RlControl;
use crate::errors::StartupError;
pub use state::AppState;

/// HTTP settings that shape the middleware.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    pub payload_limit: usize,
    pub api_key: Option<String>,
    pub cors_allow_origins: Vec<String>,
    /// The rollout-control routes and their settings; None: not served.
    pub rl: Option<RlControl>,
}

pub fn router(state: AppState, options: &HttpOptions) -> Result<Router, StartupError> {
    let lifecycle = state.lifecycle.clone();
    let with_rl = options.rl.is_some();
    let mut app = Router::new()
        .route("/", post(tgi::handlers::compat_generate))
        .route("/generate", post(tgi::handlers::generate))
        .route("/generate_stream", post(tgi::handlers::generate_stream))
        .route("/health", get(tgi::handlers::health))
        .route("/health_generate", get(tgi::handlers::health_generate))
        .route("/info", get(tgi::handlers::info))
        .route("/tokenize", post(tgi::handlers::tokenize))
        .route("/chat_tokenize", post(tgi::handlers::chat_tokenize))
        .route("/v1/models", get(openai::models::models))
        .route("/v1/completions", post(openai::completions::completions))
        .route("/v1/chat/completions", post(openai::chat::chat_completions))
        .route(
            "/api-doc/openapi.json",
            get(move || openapi::serve_document(with_rl)),
        )
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .config(utoipa_swagger_ui::Config::from("/api-doc/openapi.json")),
        )
        .route("/metrics", get(tgi::handlers::metrics))
        .layer(DefaultBodyLimit::max(options.payload_limit))
        .layer(axum::Extension(extract::PayloadLimit(
            options.payload_limit,
        )))
        .with_state(state.clone())
        .route_layer(middleware::from_fn_with_state(
            lifecycle,
            drain::refuse_when_draining,
        ));
    if let Some(key) = &options.api_key {
        if key.is_empty() {
            return Err(StartupError::Config("--api-key is empty".into()));
        }
        app = app.route_layer(middleware::from_fn_with_state(
            auth::ApiKey(Arc::new(key.as_bytes().to_vec())),
            auth::require_api_key,
        ));
    }
    // Outside the key and drain checks, so that their refusals carry x-request-id too.
    app = app.route_layer(middleware::from_fn(request_id::assign));
    // Merged after the API key's layer: the control routes take their own key, not that one.
    if let Some(rl) = &options.rl {
        app = app.merge(rl::router(state, rl));
    }
    app = app.route_layer(middleware::from_fn(track_requests));
    if !options.cors_allow_origins.is_empty() {
        app = app.layer(cors(&options.cors_allow_origins)?);
    }
    Ok(app)
}

fn cors(origins: &[String]) -> Result<CorsLayer, StartupError> {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let parsed = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o).map_err(|_| {
                    StartupError::Config(format!("--cors-allow-origin {o:?} is not a valid origin"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(parsed)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            axum::http::header::CONTENT_TYPE,
            axum::http::header::AUTHORIZATION,
            request_id::HEADER,
        ])
        .expose_headers([request_id::HEADER]))
}

/// Counts every answered request by route template and status.
async fn track_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let start = std::time::Instant::now();
    let response = next.run(req).await;
    crate::metrics::record_request(&route, response.status().as_u16(), start.elapsed());
    response
}
