//! OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.
//! Requests are mapped onto the TGI parameters and validated by the same code; anything the
//! engine cannot honour is refused with 422, never ignored.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::chat_template::ChatMessage;
use crate::errors::{OpenAiError, RouterError};
use crate::extract::OpenAiJson;
use crate::infer::{GenerationStream, Prepared};
use crate::logprobs::{self, TokenLogprob};
use crate::schemas::{FinishReason, GenerateParameters};
use crate::server::AppState;
use crate::validation::ValidationError;

/// Most choices one request may ask for.
pub const MAX_N: u32 = 8;

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
}

/// Sampling fields shared by both OpenAI request kinds.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct CommonParams {
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, deserialize_with = "crate::extract::strict::optional_object")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<StringOrList>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<Value>,
    /// tensorgate extension (as vLLM's): admission priority, higher first.
    #[serde(default)]
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(deserialize_with = "crate::extract::strict::objects")]
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tools: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    // Flattened last: serde's deny_unknown_fields sees the flattened fields as known.
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: StringOrList,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

fn unsupported(name: &'static str, why: &str) -> OpenAiError {
    ValidationError::Unsupported(name, why.to_string()).into()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

fn fingerprint(state: &AppState) -> String {
    format!("tensorgate-{}-{}", state.info.version, state.info.engine)
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

/// OpenAI parameters → TGI parameters, so that one validator checks both.
pub fn to_generate_parameters(
    c: &CommonParams,
    max_tokens: Option<i64>,
) -> Result<GenerateParameters, OpenAiError> {
    if c.logit_bias.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported("logit_bias", "no logit bias processor"));
    }
    // OpenAI: temperature 0 is greedy; anything else (default 1) samples.
    let (do_sample, temperature) = match c.temperature {
        Some(0.0) => (false, None),
        Some(t) if t.is_finite() && !(0.0..=2.0).contains(&t) => {
            return Err(ValidationError::OutOfRange {
                name: "temperature",
                bounds: ">= 0 and <= 2",
                value: t.to_string(),
            }
            .into())
        }
        Some(t) => (true, Some(t)),
        None => (true, None),
    };
    Ok(GenerateParameters {
        do_sample,
        temperature,
        top_p: c.top_p,
        seed: c.seed,
        max_new_tokens: max_tokens,
        stop: c
            .stop
            .clone()
            .map(StringOrList::into_vec)
            .unwrap_or_default(),
        frequency_penalty: c.frequency_penalty.filter(|v| *v != 0.0),
        presence_penalty: c.presence_penalty.filter(|v| *v != 0.0),
        priority: c.priority,
        ..Default::default()
    })
}

fn check_n(n: Option<u32>) -> Result<u32, OpenAiError> {
    match n.unwrap_or(1) {
        0 => Err(ValidationError::NotPositive("n", "0".into()).into()),
        n if n > MAX_N => Err(ValidationError::OutOfRange {
            name: "n",
            bounds: "<= 8",
            value: n.to_string(),
        }
        .into()),
        n => Ok(n),
    }
}

/// The text of a message: a string, or its text parts joined; other parts are refused.
pub fn message_text(m: &ChatMessageIn) -> Result<String, OpenAiError> {
    match &m.content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => Ok(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(unsupported(
                            "messages.content",
                            &format!("content parts of type `{kind}`; only text is served"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

#[utoipa::path(get, path = "/v1/models", tag = "OpenAI", responses((status = 200, description = "The served model", body = Object), (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::OpenAiErrorBody)))]
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.info.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "tensorgate",
        }]
    }))
}

/// One choice's generation, with text trimmed of stop sequences as OpenAI does.
struct Choice {
    index: u32,
    stream: GenerationStream,
    /// Some when log probabilities were asked for: the entries not yet sent.
    logprobs: Option<Vec<TokenLogprob>>,
    /// Characters of the choice's text so far (legacy `text_offset`), echo included.
    offset: usize,
    stops: Vec<String>,
    hold: usize,
    text: String,
    sent: usize,
    prompt_tokens: u32,
}

enum ChoiceEvent {
    Delta {
        index: u32,
        text: String,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    End {
        index: u32,
        text: String,
        finish: &'static str,
        completion_tokens: u32,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    Error(RouterError),
}

impl Choice {
    fn new(index: u32, stream: GenerationStream, prepared: &Prepared) -> Self {
        let stops = prepared.params.stop_sequences.clone();
        // Text that could still become a stop sequence is held back until it cannot.
        let hold = stops
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Self {
            index,
            stream,
            logprobs: None,
            offset: 0,
            stops,
            hold,
            text: String::new(),
            sent: 0,
            prompt_tokens: prepared.input_ids.len() as u32,
        }
    }

    fn releasable(&self) -> usize {
        let mut end = self.text.len().saturating_sub(self.hold).max(self.sent);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        end
    }

    async fn next(&mut self) -> Option<ChoiceEvent> {
        loop {
            let ev = match self.stream.next().await? {
                Ok(ev) => ev,
                Err(e) => return Some(ChoiceEvent::Error(e)),
            };
            if let Some(pending) = self.logprobs.as_mut() {
                pending.push(TokenLogprob::from_token(
                    &ev.token,
                    &ev.top_tokens,
                    self.offset,
                ));
            }
            if !ev.token.special {
                self.text.push_str(&ev.token.text);
                self.offset += ev.token.text.chars().count();
            }
            if let Some(end) = ev.end {
                let mut full = end.generated_text;
                if end.finish_reason == FinishReason::StopSequence {
                    if let Some(cut) = self
                        .stops
                        .iter()
                        .filter_map(|s| full.find(s.as_str()))
                        .min()
                    {
                        full.truncate(cut);
                    }
                }
                let rest = full.get(self.sent..).unwrap_or_default().to_string();
                return Some(ChoiceEvent::End {
                    index: self.index,
                    text: rest,
                    finish: finish_reason(end.finish_reason),
                    completion_tokens: end.generated_tokens,
                    logprobs: self.logprobs.as_mut().map(std::mem::take),
                });
            }
            let upto = self.releasable();
            if upto > self.sent {
                let piece = self.text[self.sent..upto].to_string();
                self.sent = upto;
                return Some(ChoiceEvent::Delta {
                    index: self.index,
                    text: piece,
                    logprobs: self.logprobs.as_mut().map(std::mem::take),
                });
            }
        }
    }
}

async fn start_choices(
    state: &AppState,
    prepared: Prepared,
    n: u32,
    logprobs: bool,
) -> Result<Vec<Choice>, OpenAiError> {
    let mut choices = Vec::with_capacity(n as usize);
    for index in 0..n {
        let mut p = prepared.clone();
        // Each extra choice samples with its own seed, derived so that a seeded request stays reproducible.
        if let Some(seed) = p.params.sampling.seed {
            p.params.sampling.seed = Some(seed.wrapping_add(u64::from(index)));
        }
        p.want_logprobs |= logprobs;
        let stream = state.infer.start(p.clone()).await?;
        let mut choice = Choice::new(index, stream, &p);
        choice.logprobs = logprobs.then(Vec::new);
        choices.push(choice);
    }
    Ok(choices)
}

fn choice_stream(choices: Vec<Choice>) -> impl Stream<Item = ChoiceEvent> {
    stream::select_all(choices.into_iter().map(|c| {
        Box::pin(stream::unfold(Some(c), |c| async move {
            let mut c = c?;
            let ev = c.next().await?;
            let done = matches!(ev, ChoiceEvent::End { .. } | ChoiceEvent::Error(_));
            Some((ev, if done { None } else { Some(c) }))
        }))
    }))
}

/// A choice run to its end.
struct Finished {
    index: u32,
    text: String,
    finish: &'static str,
    completion_tokens: u32,
    logprobs: Option<Vec<TokenLogprob>>,
}

/// Runs every choice to the end, in index order; also returns the prompt tokens of the first.
async fn collect(choices: Vec<Choice>) -> Result<(Vec<Finished>, u32), OpenAiError> {
    let prompt_tokens = choices.first().map(|c| c.prompt_tokens).unwrap_or(0);
    let n = choices.len();
    let mut texts = vec![String::new(); n];
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut done = Vec::with_capacity(n);
    let mut events = Box::pin(choice_stream(choices));
    while let Some(ev) = events.next().await {
        match ev {
            ChoiceEvent::Delta {
                index,
                text,
                logprobs,
            } => {
                texts[index as usize].push_str(&text);
                lps[index as usize].extend(logprobs.unwrap_or_default());
            }
            ChoiceEvent::End {
                index,
                text,
                finish,
                completion_tokens,
                logprobs,
            } => {
                let mut full = std::mem::take(&mut texts[index as usize]);
                full.push_str(&text);
                let logprobs = logprobs.map(|last| {
                    let mut all = std::mem::take(&mut lps[index as usize]);
                    all.extend(last);
                    all
                });
                done.push(Finished {
                    index,
                    text: full,
                    finish,
                    completion_tokens,
                    logprobs,
                });
            }
            ChoiceEvent::Error(e) => return Err(e.into()),
        }
    }
    done.sort_by_key(|d| d.index);
    Ok((done, prompt_tokens))
}

fn sse_json(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI", request_body = ChatCompletionRequest, responses((status = 200, description = "chat.completion, or chat.completion.chunk events when stream is true", body = Object),
        (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::OpenAiErrorBody),
        (status = 413, description = "Body over --payload-limit", body = crate::errors::OpenAiErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = crate::errors::OpenAiErrorBody),
        (status = 422, description = "Invalid input; the message names the limit", body = crate::errors::OpenAiErrorBody),
        (status = 424, description = "Generation failed", body = crate::errors::OpenAiErrorBody),
        (status = 429, description = "Too many requests in flight", body = crate::errors::OpenAiErrorBody),
        (status = 503, description = "Executor unavailable", body = crate::errors::OpenAiErrorBody),
))]
pub async fn chat_completions(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, OpenAiError> {
    if req.tools.as_ref().is_some_and(|v| !v.is_null())
        || req.tool_choice.as_ref().is_some_and(|v| !v.is_null())
    {
        return Err(unsupported("tools", "tool calling is not implemented yet"));
    }
    if req.response_format.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "response_format",
            "structured output is not implemented yet",
        ));
    }
    let want_logprobs = req.logprobs == Some(true);
    if req.top_logprobs.is_some_and(|n| n > 0) && !want_logprobs {
        return Err(ValidationError::OutOfRange {
            name: "top_logprobs",
            bounds: "used only with `logprobs: true`",
            value: format!("{:?}", req.top_logprobs),
        }
        .into());
    }
    if want_logprobs && !state.infer.features().logprobs {
        return Err(unsupported(
            "logprobs",
            "the engine does not return log probabilities",
        ));
    }
    if req.messages.is_empty() {
        return Err(ValidationError::OutOfRange {
            name: "messages",
            bounds: "a non-empty list",
            value: "[]".into(),
        }
        .into());
    }
    let n = check_n(req.common.n)?;
    let template = state.infer.chat_template().ok_or_else(|| {
        unsupported(
            "messages",
            "the model has no chat template; use /v1/completions",
        )
    })?;
    let messages = req
        .messages
        .iter()
        .map(|m| {
            Ok(ChatMessage {
                role: m.role.clone(),
                content: message_text(m)?,
            })
        })
        .collect::<Result<Vec<_>, OpenAiError>>()?;
    let prompt = template
        .render(&messages, true)
        .map_err(RouterError::Template)?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let mut params = to_generate_parameters(&req.common, max_tokens)?;
    params.top_n_tokens = req.top_logprobs.filter(|_| want_logprobs);
    let prepared = state.infer.prepare_prompt(prompt, false, &params).await?;
    let choices = start_choices(&state, prepared, n, want_logprobs).await?;
    let id = new_id("chatcmpl");
    let created = now();
    let model = state.info.model_id.clone();
    let fp = fingerprint(&state);

    if !req.common.stream {
        let (done, prompt_tokens) = collect(choices).await?;
        let completion: u32 = done.iter().map(|d| d.completion_tokens).sum();
        let choices: Vec<Value> = done
            .into_iter()
            .map(|d| {
                json!({
                    "index": d.index,
                    "message": {"role": "assistant", "content": d.text},
                    "logprobs": d.logprobs.as_deref().map(logprobs::chat),
                    "finish_reason": d.finish,
                })
            })
            .collect();
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fp, "choices": choices,
            "usage": Usage { prompt_tokens, completion_tokens: completion, total_tokens: prompt_tokens + completion },
        }))
        .into_response());
    }

    let include_usage = req
        .common
        .stream_options
        .map(|o| o.include_usage)
        .unwrap_or(false);
    let prompt_tokens = choices.first().map(|c| c.prompt_tokens).unwrap_or(0);
    let chunk = move |choices: Value, usage: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fp, "choices": choices, "usage": usage,
        })
    };
    let first: Vec<Value> = (0..n)
        .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
        .collect();
    let events = async_stream::stream! {
        yield Ok::<_, Infallible>(sse_json(&chunk(json!(first), Value::Null)));
        let mut completion = 0u32;
        let mut events = Box::pin(choice_stream(choices));
        while let Some(ev) = events.next().await {
            match ev {
                ChoiceEvent::Delta { index, text, logprobs } => {
                    let lp = logprobs.as_deref().map(logprobs::chat);
                    yield Ok(sse_json(&chunk(json!([{"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}]), Value::Null)));
                }
                ChoiceEvent::End { index, text, finish, completion_tokens, logprobs } => {
                    completion += completion_tokens;
                    let lp = logprobs.as_deref().map(logprobs::chat);
                    yield Ok(sse_json(&chunk(json!([{"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": finish}]), Value::Null)));
                }
                ChoiceEvent::Error(e) => {
                    yield Ok(sse_json(&serde_json::to_value(e.openai_body()).unwrap_or_default()));
                    return;
                }
            }
        }
        if include_usage {
            let usage = json!(Usage { prompt_tokens, completion_tokens: completion, total_tokens: prompt_tokens + completion });
            yield Ok(sse_json(&chunk(json!([]), usage)));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI", request_body = CompletionRequest, responses((status = 200, description = "text_completion, or events when stream is true", body = Object),
        (status = 401, description = "API key missing or wrong (only with --api-key)", body = crate::errors::OpenAiErrorBody),
        (status = 413, description = "Body over --payload-limit", body = crate::errors::OpenAiErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = crate::errors::OpenAiErrorBody),
        (status = 422, description = "Invalid input; the message names the limit", body = crate::errors::OpenAiErrorBody),
        (status = 424, description = "Generation failed", body = crate::errors::OpenAiErrorBody),
        (status = 429, description = "Too many requests in flight", body = crate::errors::OpenAiErrorBody),
        (status = 503, description = "Executor unavailable", body = crate::errors::OpenAiErrorBody),
))]
pub async fn completions(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, OpenAiError> {
    // Legacy `logprobs: N`: the chosen token's logprob and the N most likely (0 = only it).
    let want_logprobs = req.logprobs.is_some();
    if want_logprobs && !state.infer.features().logprobs {
        return Err(unsupported(
            "logprobs",
            "the engine does not return log probabilities",
        ));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(unsupported("best_of", "only best_of = 1 is served"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "no fill-in-the-middle"));
    }
    let n = check_n(req.common.n)?;
    let prompts = req.prompt.into_vec();
    if prompts.is_empty() || prompts.len() > MAX_N as usize {
        return Err(ValidationError::OutOfRange {
            name: "prompt",
            bounds: "one string or a list of 1 to 8 strings",
            value: format!("{} prompts", prompts.len()),
        }
        .into());
    }
    if prompts.len() as u32 * n > MAX_N {
        return Err(ValidationError::OutOfRange {
            name: "n",
            bounds: "such that prompts × n <= 8",
            value: format!("{} × {n}", prompts.len()),
        }
        .into());
    }
    let mut params = to_generate_parameters(&req.common, req.max_tokens.or(Some(16)))?;
    params.top_n_tokens = req.logprobs.filter(|n| *n > 0);
    // Every prompt is validated before any starts, so a bad one refuses the whole request.
    let mut prepared = Vec::with_capacity(prompts.len());
    for p in &prompts {
        prepared.push(state.infer.prepare_prompt(p.clone(), true, &params).await?);
    }
    let mut choices = Vec::new();
    for (pi, p) in prepared.into_iter().enumerate() {
        for mut c in start_choices(&state, p, n, want_logprobs).await? {
            c.index += pi as u32 * n;
            if req.echo {
                c.offset = prompts[pi].chars().count();
            }
            choices.push(c);
        }
    }
    let prompt_tokens_total: u32 = choices
        .iter()
        .step_by(n as usize)
        .map(|c| c.prompt_tokens)
        .sum();
    let echo_of = |index: u32| -> String {
        if req.echo {
            prompts[(index / n) as usize].clone()
        } else {
            String::new()
        }
    };
    let id = new_id("cmpl");
    let created = now();
    let model = state.info.model_id.clone();
    let fp = fingerprint(&state);

    if !req.common.stream {
        let (done, _) = collect(choices).await?;
        let completion: u32 = done.iter().map(|d| d.completion_tokens).sum();
        let choices: Vec<Value> = done
            .into_iter()
            .map(|d| {
                json!({"index": d.index, "text": format!("{}{}", echo_of(d.index), d.text), "logprobs": d.logprobs.as_deref().map(logprobs::completion), "finish_reason": d.finish})
            })
            .collect();
        return Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fp, "choices": choices,
            "usage": Usage { prompt_tokens: prompt_tokens_total, completion_tokens: completion, total_tokens: prompt_tokens_total + completion },
        }))
        .into_response());
    }

    let include_usage = req
        .common
        .stream_options
        .map(|o| o.include_usage)
        .unwrap_or(false);
    let echoes: Vec<String> = (0..choices.len() as u32).map(echo_of).collect();
    let chunk = move |choices: Value, usage: Value| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fp, "choices": choices, "usage": usage,
        })
    };
    let events = async_stream::stream! {
        for (index, echo) in echoes.iter().enumerate() {
            if !echo.is_empty() {
                yield Ok::<_, Infallible>(sse_json(&chunk(json!([{"index": index, "text": echo, "logprobs": null, "finish_reason": null}]), Value::Null)));
            }
        }
        let mut completion = 0u32;
        let mut events = Box::pin(choice_stream(choices));
        while let Some(ev) = events.next().await {
            match ev {
                ChoiceEvent::Delta { index, text, logprobs } => {
                    let lp = logprobs.as_deref().map(logprobs::completion);
                    yield Ok(sse_json(&chunk(json!([{"index": index, "text": text, "logprobs": lp, "finish_reason": null}]), Value::Null)));
                }
                ChoiceEvent::End { index, text, finish, completion_tokens, logprobs } => {
                    completion += completion_tokens;
                    let lp = logprobs.as_deref().map(logprobs::completion);
                    yield Ok(sse_json(&chunk(json!([{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]), Value::Null)));
                }
                ChoiceEvent::Error(e) => {
                    yield Ok(sse_json(&serde_json::to_value(e.openai_body()).unwrap_or_default()));
                    return;
                }
            }
        }
        if include_usage {
            let usage = json!(Usage { prompt_tokens: prompt_tokens_total, completion_tokens: completion, total_tokens: prompt_tokens_total + completion });
            yield Ok(sse_json(&chunk(json!([]), usage)));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_greedy_and_default_samples() {
        let greedy = to_generate_parameters(
            &CommonParams {
                temperature: Some(0.0),
                ..Default::default()
            },
            None,
        )
        .ok()
        .expect("valid");
        assert!(!greedy.do_sample && greedy.temperature.is_none());
        let default = to_generate_parameters(&CommonParams::default(), Some(5))
            .ok()
            .expect("valid");
        assert!(default.do_sample);
        assert_eq!(default.max_new_tokens, Some(5));
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let r: ChatCompletionRequest =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":"hi"}],"stop":"x"}"#)
                .expect("parses");
        let p = to_generate_parameters(&r.common, None).ok().expect("valid");
        assert_eq!(p.stop, vec!["x"]);
        let r: CompletionRequest =
            serde_json::from_str(r#"{"prompt":["a","b"],"stop":["x","y"]}"#).expect("parses");
        assert_eq!(r.prompt.into_vec().len(), 2);
    }

    #[test]
    fn text_parts_are_joined_and_images_refused() {
        let m: ChatMessageIn = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        )
        .expect("parses");
        assert_eq!(message_text(&m).ok().as_deref(), Some("ab"));
        let m: ChatMessageIn = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}"#,
        )
        .expect("parses");
        assert!(message_text(&m).is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<ChatCompletionRequest, _> =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":"hi"}],"max_token":3}"#);
        assert!(r.is_err());
    }

    #[test]
    fn n_is_bounded() {
        assert!(check_n(Some(0)).is_err());
        assert!(check_n(Some(9)).is_err());
        assert_eq!(check_n(None).ok(), Some(1));
    }
}
