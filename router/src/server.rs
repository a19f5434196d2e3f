//! HTTP routes and shared state.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::ApiKey;
use crate::errors::RouterError;
use crate::extract::TgiJson;
use crate::infer::{Infer, TokenEvent};
use crate::lifecycle::Lifecycle;
use crate::pb;
use crate::schemas::{
    Details, GenerateRequest, GenerateResponse, Info, SimpleToken, TokenizeRequest,
};
use crate::sse;

#[derive(Clone)]
pub struct AppState {
    pub infer: Arc<Infer>,
    pub info: Arc<Info>,
    pub metrics: PrometheusHandle,
    pub lifecycle: Lifecycle,
}

/// HTTP settings that shape the middleware.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    pub payload_limit: usize,
    pub api_key: Option<String>,
    pub cors_allow_origins: Vec<String>,
}

/// An error in the shape of the route it answers: OpenAI's under /v1, TGI's elsewhere.
pub fn error_response(path: &str, e: RouterError) -> Response {
    if path.starts_with("/v1/") {
        crate::errors::OpenAiError(e).into_response()
    } else {
        e.into_response()
    }
}

pub fn router(state: AppState, options: &HttpOptions) -> Result<Router, String> {
    let lifecycle = state.lifecycle.clone();
    let mut app = Router::new()
        .route("/", post(compat_generate))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/tokenize", post(tokenize))
        .route("/v1/models", get(crate::openai::models))
        .route("/v1/completions", post(crate::openai::completions))
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        )
        .route("/api-doc/openapi.json", get(crate::openapi::serve_document))
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .config(utoipa_swagger_ui::Config::from("/api-doc/openapi.json")),
        )
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(options.payload_limit))
        .with_state(state)
        .route_layer(middleware::from_fn_with_state(
            lifecycle,
            crate::lifecycle::refuse_when_draining,
        ));
    if let Some(key) = &options.api_key {
        if key.is_empty() {
            return Err("--api-key is empty".into());
        }
        app = app.route_layer(middleware::from_fn_with_state(
            ApiKey(Arc::new(key.as_bytes().to_vec())),
            crate::auth::require_api_key,
        ));
    }
    app = app.route_layer(middleware::from_fn(track_requests));
    if !options.cors_allow_origins.is_empty() {
        app = app.layer(cors(&options.cors_allow_origins)?);
    }
    Ok(app)
}

fn cors(origins: &[String]) -> Result<CorsLayer, String> {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let parsed = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o)
                    .map_err(|_| format!("--cors-allow-origin {o:?} is not a valid origin"))
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
        ]))
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

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "TGI", responses((status = 200, description = "Prometheus metrics (text exposition format)", body = String, content_type = "text/plain"), (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::ErrorBody)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/info", tag = "TGI", responses((status = 200, description = "Served model and limits", body = Info), (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::ErrorBody)))]
pub async fn info(State(state): State<AppState>) -> Json<Info> {
    Json((*state.info).clone())
}

/// `POST /tokenize`: the router's own tokenization of `inputs` (as sent raw, TGI's route).
#[utoipa::path(post, path = "/tokenize", tag = "TGI", request_body = TokenizeRequest, responses((status = 200, description = "Tokens", body = Vec<SimpleToken>),
        (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::ErrorBody),
        (status = 413, description = "Body over --payload-limit", body = crate::errors::ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = crate::errors::ErrorBody),
        (status = 422, description = "Invalid input; the message names the limit", body = crate::errors::ErrorBody),
        (status = 424, description = "Generation failed", body = crate::errors::ErrorBody),
        (status = 429, description = "Too many requests in flight", body = crate::errors::ErrorBody),
        (status = 503, description = "Executor unavailable", body = crate::errors::ErrorBody),
))]
pub async fn tokenize(
    State(state): State<AppState>,
    TgiJson(req): TgiJson<TokenizeRequest>,
) -> Result<Json<Vec<SimpleToken>>, RouterError> {
    let tokens = state
        .infer
        .tokenizer()
        .encode_with_offsets(req.inputs, req.add_special_tokens.unwrap_or(true))
        .await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|(id, text, start, stop)| SimpleToken {
                id,
                text,
                start,
                stop,
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/health", tag = "TGI", responses((status = 200, description = "Ready"), (status = 503, description = "Executor not ready", body = crate::errors::ErrorBody)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let executor = state.infer.executor();
    if !executor.is_connected() {
        return RouterError::Unavailable("the executor is not connected".into()).into_response();
    }
    let probe = async {
        let mut client = executor.client().await.map_err(|e| e.to_string())?;
        client
            .health(pb::HealthRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(h)) if h.ready => StatusCode::OK.into_response(),
        Ok(Ok(h)) => {
            RouterError::Unavailable(format!("executor not ready: {}", h.reason)).into_response()
        }
        Ok(Err(e)) => RouterError::Unavailable(e).into_response(),
        Err(_) => RouterError::Unavailable("executor health check timed out after 2s".into())
            .into_response(),
    }
}

/// `POST /`: TGI's compatibility route, dispatching on `stream`. As in TGI, the
/// non-streaming answer is a one-element list (what TGI's Python clients parse).
#[utoipa::path(post, path = "/", tag = "TGI", request_body = GenerateRequest, responses((status = 200, description = "A one-element list, or server-sent events when stream is true", body = Vec<GenerateResponse>, content_type = "application/json"),
        (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::ErrorBody),
        (status = 413, description = "Body over --payload-limit", body = crate::errors::ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = crate::errors::ErrorBody),
        (status = 422, description = "Invalid input; the message names the limit", body = crate::errors::ErrorBody),
        (status = 424, description = "Generation failed", body = crate::errors::ErrorBody),
        (status = 429, description = "Too many requests in flight", body = crate::errors::ErrorBody),
        (status = 503, description = "Executor unavailable", body = crate::errors::ErrorBody),
))]
pub async fn compat_generate(state: State<AppState>, body: TgiJson<GenerateRequest>) -> Response {
    if body.0.stream {
        generate_stream(state, body).await
    } else {
        match generate(state, body).await {
            Ok(Json(response)) => Json(vec![response]).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

#[utoipa::path(post, path = "/generate", tag = "TGI", request_body = GenerateRequest, responses((status = 200, description = "Generated text", body = GenerateResponse),
        (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::ErrorBody),
        (status = 413, description = "Body over --payload-limit", body = crate::errors::ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = crate::errors::ErrorBody),
        (status = 422, description = "Invalid input; the message names the limit", body = crate::errors::ErrorBody),
        (status = 424, description = "Generation failed", body = crate::errors::ErrorBody),
        (status = 429, description = "Too many requests in flight", body = crate::errors::ErrorBody),
        (status = 503, description = "Executor unavailable", body = crate::errors::ErrorBody),
))]
pub async fn generate(
    State(state): State<AppState>,
    TgiJson(req): TgiJson<GenerateRequest>,
) -> Result<Json<GenerateResponse>, RouterError> {
    let prepared = state.infer.prepare(&req.inputs, &req.parameters).await?;
    let want_details = prepared.params.details;
    let full_text = prepared.params.return_full_text;
    let mut prepared = prepared;
    // TGI shows log probabilities in `details.tokens` only.
    prepared.want_logprobs |= prepared.params.details;
    let mut stream = state.infer.start(prepared).await?;
    let mut tokens = Vec::new();
    let mut top_tokens = Vec::new();
    while let Some(ev) = stream.next().await {
        let TokenEvent {
            token,
            top_tokens: top,
            end,
            ..
        } = ev?;
        tokens.push(token);
        if !top.is_empty() {
            top_tokens.push(top);
        }
        if let Some(end) = end {
            let generated_text = if full_text {
                format!("{}{}", req.inputs, end.generated_text)
            } else {
                end.generated_text
            };
            let details = want_details.then(|| Details {
                finish_reason: end.finish_reason,
                generated_tokens: end.generated_tokens,
                seed: end.seed,
                input_length: end.input_length,
                prefill: vec![],
                tokens,
                top_tokens,
            });
            return Ok(Json(GenerateResponse {
                generated_text,
                details,
            }));
        }
    }
    Err(RouterError::Generation(
        "the generation ended without a final token".into(),
    ))
}

#[utoipa::path(post, path = "/generate_stream", tag = "TGI", request_body = GenerateRequest, responses((status = 200, description = "Server-sent events, one StreamResponse per token", body = crate::schemas::StreamResponse, content_type = "text/event-stream"),
        (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::ErrorBody),
        (status = 413, description = "Body over --payload-limit", body = crate::errors::ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = crate::errors::ErrorBody),
        (status = 422, description = "Invalid input; the message names the limit", body = crate::errors::ErrorBody),
        (status = 424, description = "Generation failed", body = crate::errors::ErrorBody),
        (status = 429, description = "Too many requests in flight", body = crate::errors::ErrorBody),
        (status = 503, description = "Executor unavailable", body = crate::errors::ErrorBody),
))]
pub async fn generate_stream(
    State(state): State<AppState>,
    TgiJson(req): TgiJson<GenerateRequest>,
) -> Response {
    // Errors before the first byte get a proper status; later ones an error event.
    let prepared = match state.infer.prepare(&req.inputs, &req.parameters).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let prefix = prepared.params.return_full_text.then(|| req.inputs.clone());
    let mut prepared = prepared;
    // Every TGI stream event carries its token's log probability.
    prepared.want_logprobs = true;
    match state.infer.start(prepared).await {
        Ok(stream) => Sse::new(events(stream, prefix))
            .keep_alive(KeepAlive::default())
            .into_response(),
        Err(e) => e.into_response(),
    }
}

fn events(
    mut stream: crate::infer::GenerationStream,
    prefix: Option<String>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    let last = ev.end.is_some();
                    yield Ok(sse::token_event(&sse::stream_response(ev, prefix.as_deref())));
                    if last {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stream ended with an error");
                    yield Ok(sse::error_event(&e));
                    break;
                }
            }
        }
    }
}
