//! Handlers of TGI's routes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::Stream;

use crate::errors::RouterError;
use crate::generation::parameters::GenerateParameters;
use crate::generation::requests::RequestId;
use crate::generation::stream::{collect, Completed, GenerationStream, PromptToken};
use crate::generation::validation::ValidationError;
use crate::http::extract::TgiJson;
use crate::http::openai::schemas::ChatCompletionRequest;
use crate::http::responses::{TgiAuthErrors, TgiErrors};
use crate::http::state::AppState;
use crate::http::tgi::schemas::{
    BestOfSequence, ChatTokenizeResponse, Details, GenerateRequest, GenerateResponse, Info,
    PrefillToken, SimpleToken, TokenizeRequest,
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
    let mut info = (*state.info).clone();
    let control = state.infer.control();
    info.weight_version = control.weight_version();
    info.released_memory_tags = control.released_tags();
    info.workers = state.infer.executor().status();
    Json(info)
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

#[utoipa::path(get, path = "/health", tag = "TGI", responses((status = 200, description = "Ready"), (status = 503, description = "Executor not ready, or engine memory released (error_type `sleeping`)", body = crate::errors::ErrorBody)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let executor = state.infer.executor();
    if !executor.is_connected() {
        return RouterError::Unavailable("the executor is not connected".into()).into_response();
    }
    if let Some(why) = state.infer.control().sleeping() {
        return RouterError::Sleeping(why).into_response();
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
#[utoipa::path(get, path = "/health_generate", tag = "TGI", responses((status = 200, description = "One token was generated"), (status = 503, description = "The engine could not generate within 10 s, is unavailable, sleeping, or held by rollout control", body = crate::errors::ErrorBody)))]
pub async fn health_generate(State(state): State<AppState>) -> Response {
    // Held by rollout control, the probe would only wait out its timeout.
    let control = state.infer.control();
    if control.paused().is_some() || control.update_in_progress() {
        return RouterError::Unavailable(
            "generation is held by rollout control (/pause_generation, or a bucketed \
             /update_weights not yet finished)"
                .into(),
        )
        .into_response();
    }
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
        Ok(Err(e @ RouterError::Sleeping(_))) => e.into_response(),
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
pub async fn compat_generate(
    state: State<AppState>,
    rid: Extension<RequestId>,
    body: TgiJson<GenerateRequest>,
) -> Response {
    if body.0.stream {
        generate_stream(state, rid, body).await
    } else {
        match generate(state, rid, body).await {
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
    Extension(rid): Extension<RequestId>,
    TgiJson(req): TgiJson<GenerateRequest>,
) -> Result<Json<GenerateResponse>, RouterError> {
    let (mut prepared, prompt_text) = prepare(&state, &req).await?;
    prepared.request_id = Some(rid);
    // As TGI: prefill details come inside `details`.
    let want_details = prepared.params.details || prepared.params.prompt_logprobs;
    let full_text = prepared.params.return_full_text;
    let best_of = prepared.params.best_of;
    // TGI shows log probabilities in `details.tokens` only; best_of ranks sequences by them.
    prepared.want_logprobs |= want_details || best_of > 1;
    let mut done = if best_of > 1 {
        // As TGI: n requests of the prompt, each with its own random seed (a given seed is
        // refused), admitted together.
        let group = (0..best_of)
            .map(|_| {
                let mut p = prepared.clone();
                p.params.sampling.seed = Some(rand::random());
                p
            })
            .collect();
        let streams = state.infer.start_group(group).await?;
        futures::future::try_join_all(streams.into_iter().map(collect)).await?
    } else {
        vec![collect(state.infer.start(prepared).await?).await?]
    };
    let best = done.remove(best_sequence(&done));
    let text = |generated: String| {
        if full_text {
            format!("{prompt_text}{generated}")
        } else {
            generated
        }
    };
    let details = want_details.then(|| {
        let best_of_sequences = (best_of > 1).then(|| {
            done.into_iter()
                .map(|d| BestOfSequence {
                    finish_reason: d.end.finish_reason,
                    generated_tokens: d.end.generated_tokens,
                    seed: d.end.seed,
                    prefill: prefill(d.prefill.as_deref()),
                    tokens: d.tokens,
                    top_tokens: d.top_tokens,
                    generated_text: text(d.end.generated_text),
                })
                .collect()
        });
        Details {
            finish_reason: best.end.finish_reason,
            generated_tokens: best.end.generated_tokens,
            seed: best.end.seed,
            input_length: best.end.input_length,
            prefill: prefill(best.prefill.as_deref()),
            tokens: best.tokens,
            best_of_sequences,
            top_tokens: best.top_tokens,
            weight_version: best.end.weight_version,
        }
    });
    Ok(Json(GenerateResponse {
        generated_text: text(best.end.generated_text),
        details,
    }))
}

/// TGI's choice among `best_of` sequences (router/src/infer/mod.rs `generate_best_of`): the
/// highest mean log probability of the generated tokens; the first on a tie. (The same as the
/// highest cumulative log probability when the sequences have the same length.)
fn best_sequence(done: &[Completed]) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, d) in done.iter().enumerate() {
        let sum: f32 = d
            .tokens
            .iter()
            .map(|t| t.logprob.unwrap_or(f32::NEG_INFINITY))
            .sum();
        let mean = if d.tokens.is_empty() {
            f32::NEG_INFINITY
        } else {
            sum / d.tokens.len() as f32
        };
        if mean > best.1 {
            best = (i, mean);
        }
    }
    best.0
}

/// TGI's `details.prefill`: every prompt token, the first with a null logprob (empty unless
/// `decoder_input_details`).
fn prefill(tokens: Option<&[PromptToken]>) -> Vec<PrefillToken> {
    tokens
        .unwrap_or_default()
        .iter()
        .map(|p| PrefillToken {
            id: p.id,
            text: p.text.clone(),
            logprob: p.logprob,
        })
        .collect()
}

#[utoipa::path(post, path = "/generate_stream", tag = "TGI", request_body = GenerateRequest, responses((status = 200, description = "Server-sent events, one StreamResponse per token", body = crate::http::tgi::schemas::StreamResponse, content_type = "text/event-stream"), TgiErrors))]
pub async fn generate_stream(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    TgiJson(req): TgiJson<GenerateRequest>,
) -> Response {
    // As TGI, neither is streamed (TGI answers these in an error event; before the first byte
    // they get their 422 here, as every other validation error does).
    if req.parameters.best_of.unwrap_or(1) != 1 {
        return RouterError::from(ValidationError::BestOfStream).into_response();
    }
    if req.parameters.decoder_input_details {
        return RouterError::from(ValidationError::PrefillDetailsStream).into_response();
    }
    // Errors before the first byte get a proper status; later ones an error event.
    let (mut prepared, prompt_text) = match prepare(&state, &req).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    prepared.request_id = Some(rid);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::stream::{EndInfo, FinishReason, Token};

    fn done(logprobs: &[f32]) -> Completed {
        Completed {
            tokens: logprobs
                .iter()
                .map(|&l| Token {
                    id: 1,
                    text: "x".into(),
                    logprob: Some(l),
                    special: false,
                })
                .collect(),
            top_tokens: vec![],
            end: EndInfo {
                finish_reason: FinishReason::Length,
                generated_text: String::new(),
                stop_at: None,
                generated_tokens: logprobs.len() as u32,
                seed: None,
                input_length: 1,
                weight_version: "0".into(),
            },
            prefill: None,
        }
    }

    #[test]
    fn best_of_picks_the_highest_mean_logprob_as_tgi() {
        // Cumulative: -3.0 vs -2.0; per token: -1.0 vs -2.0. TGI ranks by the mean.
        assert_eq!(
            best_sequence(&[done(&[-1.0, -1.0, -1.0]), done(&[-2.0])]),
            0
        );
        assert_eq!(
            best_sequence(&[done(&[-2.0, -2.0]), done(&[-0.5, -1.5])]),
            1
        );
        // A tie keeps the first; a sequence without log probabilities never wins.
        assert_eq!(best_sequence(&[done(&[-1.0]), done(&[-1.0])]), 0);
        let mut missing = done(&[-0.1]);
        missing.tokens[0].logprob = None;
        assert_eq!(best_sequence(&[missing, done(&[-5.0])]), 1);
    }

    #[test]
    fn prefill_is_every_prompt_token_the_first_without_a_logprob() {
        let p = |id, logprob| PromptToken {
            id,
            text: format!("t{id}"),
            logprob,
            top: vec![],
        };
        let shown = prefill(Some(&[p(7, None), p(8, Some(-0.25))]));
        assert_eq!(
            serde_json::to_value(&shown).expect("json"),
            serde_json::json!([
                {"id": 7, "text": "t7", "logprob": null},
                {"id": 8, "text": "t8", "logprob": -0.25}
            ])
        );
        assert!(prefill(None).is_empty());
    }
}
