//! Handlers of TGI's routes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;

use crate::errors::RouterError;
use crate::generation::parameters::GenerateParameters;
use crate::generation::stream::{collect, GenerationStream};
use crate::generation::validation::ValidationError;
use crate::http::extract::TgiJson;
use crate::http::openai::schemas::ChatCompletionRequest;
use crate::http::responses::{TgiAuthErrors, TgiErrors};
use crate::http::state::AppState;
use crate::http::tgi::schemas::{
    ChatTokenizeResponse, Details, GenerateRequest, GenerateResponse, Info, SimpleToken,
    TokenizeRequest,
};
use crate::http::tgi::sse;
use crate::pb;

/// How long `/health_generate` waits for its one token.
const HEALTH_GENERATE_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "TGI", responses((status = 200, description = "Prometheus metrics (text exposition format)", body = String, content_type = "text/plain"), TgiAuthErrors))]
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

#[utoipa::path(get, path = "/info", tag = "TGI", responses((status = 200, description = "Served model and limits", body = Info), TgiAuthErrors))]
pub async fn info(State(state): State<AppState>) -> Json<Info> {
    Json((*state.info).clone())
}

fn simple_tokens(tokens: Vec<(u32, String, usize, usize)>) -> Vec<SimpleToken> {
    tokens
        .into_iter()
        .map(|(id, text, start, stop)| SimpleToken {
            id,
            text,
            start,
            stop,
        })
        .collect()
}

/// `POST /tokenize`: the router's own tokenization of `inputs` (as sent raw, TGI's route).
#[utoipa::path(post, path = "/tokenize", tag = "TGI", request_body = TokenizeRequest, responses((status = 200, description = "Tokens", body = Vec<SimpleToken>), TgiErrors))]
pub async fn tokenize(
    State(state): State<AppState>,
    TgiJson(req): TgiJson<TokenizeRequest>,
) -> Result<Json<Vec<SimpleToken>>, RouterError> {
    let tokens = state
        .infer
        .tokenizer()
        .encode_with_offsets(req.inputs, req.add_special_tokens.unwrap_or(true))
        .await?;
    Ok(Json(simple_tokens(tokens)))
}

/// `POST /chat_tokenize` (TGI's): a chat request's messages through the chat template, and
/// the prompt's tokens, exactly as `/v1/chat/completions` would send them.
#[utoipa::path(post, path = "/chat_tokenize", tag = "TGI", request_body = ChatCompletionRequest, responses((status = 200, description = "The templated prompt and its tokens", body = ChatTokenizeResponse), TgiErrors))]
pub async fn chat_tokenize(
    State(state): State<AppState>,
    TgiJson(req): TgiJson<ChatCompletionRequest>,
) -> Result<Json<ChatTokenizeResponse>, RouterError> {
    let templated_text = crate::http::openai::chat::render_prompt(&state, &req).map_err(|e| e.0)?;
    let tokens = state
        .infer
        .tokenizer()
        .encode_with_offsets(templated_text.clone(), false)
        .await?;
    Ok(Json(ChatTokenizeResponse {
        tokenize_response: simple_tokens(tokens),
        templated_text,
    }))
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

/// `GET /health_generate` (trtllm-serve's name): generates one token through the whole path
/// (admission, executor, engine), for load balancers that must know the engine works, not
/// only that the process answers. Open without a key, as `/health`.
#[utoipa::path(get, path = "/health_generate", tag = "TGI", responses((status = 200, description = "One token was generated"), (status = 503, description = "The engine could not generate within 10 s, or is unavailable", body = crate::errors::ErrorBody)))]
pub async fn health_generate(State(state): State<AppState>) -> Response {
    let params = GenerateParameters {
        max_new_tokens: Some(1),
        ..Default::default()
    };
    let probe = async {
        let prepared = state
            .infer
            .prepare_prompt("ping".into(), true, &params)
            .await?;
        collect(state.infer.start(prepared).await?).await
    };
    match tokio::time::timeout(HEALTH_GENERATE_TIMEOUT, probe).await {
        Ok(Ok(_)) => StatusCode::OK.into_response(),
        Ok(Err(e)) => {
            RouterError::Unavailable(format!("the health generation failed: {e}")).into_response()
        }
        Err(_) => RouterError::Unavailable(format!(
            "no token within {}s",
            HEALTH_GENERATE_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

/// `POST /`: TGI's compatibility route, dispatching on `stream`. As in TGI, the
/// non-streaming answer is a one-element list (what TGI's Python clients parse).
#[utoipa::path(post, path = "/", tag = "TGI", request_body = GenerateRequest, responses((status = 200, description = "A one-element list, or server-sent events when stream is true", body = Vec<GenerateResponse>, content_type = "application/json"), TgiErrors))]
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

/// A generate request's prompt, prepared, and its text (what `return_full_text` prepends).
async fn prepare(
    state: &AppState,
    req: &GenerateRequest,
) -> Result<(crate::generation::infer::Prepared, String), RouterError> {
    match (&req.inputs, &req.input_ids) {
        (Some(text), None) => Ok((
            state.infer.prepare(text, &req.parameters).await?,
            text.clone(),
        )),
        (None, Some(ids)) => {
            let prepared = state
                .infer
                .prepare_ids(ids.clone(), &req.parameters, "input_ids")
                .await?;
            let text = if prepared.params.return_full_text {
                state.infer.tokenizer().decode(ids.clone()).await?
            } else {
                String::new()
            };
            Ok((prepared, text))
        }
        (Some(_), Some(_)) => Err(ValidationError::OutOfRange {
            name: "input_ids",
            bounds: "given without `inputs` (one prompt per request)",
            value: "both `inputs` and `input_ids`".into(),
        }
        .into()),
        (None, None) => Err(ValidationError::EmptyInput.into()),
    }
}

#[utoipa::path(post, path = "/generate", tag = "TGI", request_body = GenerateRequest, responses((status = 200, description = "Generated text", body = GenerateResponse), TgiErrors))]
pub async fn generate(
    State(state): State<AppState>,
    TgiJson(req): TgiJson<GenerateRequest>,
) -> Result<Json<GenerateResponse>, RouterError> {
    let (mut prepared, prompt_text) = prepare(&state, &req).await?;
    let want_details = prepared.params.details;
    let full_text = prepared.params.return_full_text;
    // TGI shows log probabilities in `details.tokens` only.
    prepared.want_logprobs |= want_details;
    let done = collect(state.infer.start(prepared).await?).await?;
    let end = done.end;
    let generated_text = if full_text {
        format!("{prompt_text}{}", end.generated_text)
    } else {
        end.generated_text
    };
    let details = want_details.then(|| Details {
        finish_reason: end.finish_reason,
        generated_tokens: end.generated_tokens,
        seed: end.seed,
        input_length: end.input_length,
        prefill: vec![],
        tokens: done.tokens,
        top_tokens: done.top_tokens,
    });
    Ok(Json(GenerateResponse {
        generated_text,
        details,
    }))
}

#[utoipa::path(post, path = "/generate_stream", tag = "TGI", request_body = GenerateRequest, responses((status = 200, description = "Server-sent events, one StreamResponse per token", body = crate::http::tgi::schemas::StreamResponse, content_type = "text/event-stream"), TgiErrors))]
pub async fn generate_stream(
    State(state): State<AppState>,
    TgiJson(req): TgiJson<GenerateRequest>,
) -> Response {
    // Errors before the first byte get a proper status; later ones an error event.
    let (mut prepared, prompt_text) = match prepare(&state, &req).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let prefix = prepared.params.return_full_text.then_some(prompt_text);
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
    mut stream: GenerationStream,
    prefix: Option<String>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    let last = ev.end.is_some();
                    let last_id = stream.last_token_id();
                    yield Ok(sse::token_event(&sse::stream_response(ev, prefix.as_deref(), last_id)));
                    if last {
                        break;
                    }
                }
                Err(e) => {
                    e.log();
                    yield Ok(sse::error_event(&e));
                    break;
                }
            }
        }
    }
}
