//! The choices of one OpenAI request and the one path that turns them into an answer: a
//! JSON body (each choice collected by `generation::stream::collect`) or server-sent chunks
//! (text held back while it could still become a stop sequence, or a tool call). Chat and
//! completions differ only in how a choice is rendered (`Family`); a chat choice whose request
//! has tools is read for calls here, by the same reader whole or streamed.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use crate::errors::{OpenAiError, RouterError};
use crate::generation::infer::Prepared;
use crate::generation::stop::{floor_char_boundary, StopSequences};
use crate::generation::stream::{collect, FinishReason, GenerationStream};
use crate::generation::tool_parsers::{ToolCall, ToolCallReader, ToolCallStream, ToolDelta};
use crate::http::openai::logprobs::TokenLogprob;
use crate::http::openai::schemas::Usage;
use crate::http::state::AppState;

/// How one API family renders choices.
pub trait Family: Send + Sync + 'static {
    /// `object` of the whole answer and of each streamed chunk.
    const OBJECT: &'static str;
    const CHUNK_OBJECT: &'static str;
    /// A choice of the whole answer.
    fn full_choice(&self, c: FinishedChoice) -> Value;
    /// A choice of a streamed chunk; `finish` is set on the choice's last one.
    fn chunk_choice(
        &self,
        index: u32,
        text: &str,
        logprobs: Option<&[TokenLogprob]>,
        finish: Option<&str>,
    ) -> Value;
    /// A streamed chunk's choice that carries text only (no log probabilities, not the last
    /// one), written into `out` byte for byte as `chunk_choice` renders it: the chunk of
    /// nearly every token, so it skips building a JSON tree.
    fn write_text_choice(&self, out: &mut Vec<u8>, index: u32, text: &str);
    /// Chunks sent before any generated text (chat's role, completions' echo).
    fn prelude(&self, n: u32) -> Vec<Value>;
    /// A streamed chunk that carries tool-call deltas. Only choices read for tool calls
    /// (`Choice::read_tool_calls`, which only chat does) have any.
    fn tool_chunk_choice(
        &self,
        index: u32,
        text: &str,
        calls: &[ToolDelta],
        logprobs: Option<&[TokenLogprob]>,
        finish: Option<&str>,
    ) -> Value {
        debug_assert!(calls.is_empty(), "this family does not stream tool calls");
        self.chunk_choice(index, text, logprobs, finish)
    }
}

/// A choice run to its end, as the whole answer shows it.
pub struct FinishedChoice {
    pub index: u32,
    /// Without the stop sequence, as OpenAI answers; with tool calls, the text before them.
    pub text: String,
    pub finish: &'static str,
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Calls read from the text (when the choice is read for them).
    pub tool_calls: Vec<ToolCall>,
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

/// A choice that ended by itself after calling tools ends with `tool_calls`; one cut by
/// `max_tokens` still says `length`.
fn with_calls(finish: &'static str, called: bool) -> &'static str {
    if called && finish == "stop" {
        "tool_calls"
    } else {
        finish
    }
}

/// One running choice.
pub struct Choice {
    pub index: u32,
    stream: GenerationStream,
    /// Log probabilities asked for.
    logprobs: bool,
    /// Characters before the choice's text (legacy `text_offset`): the echoed prompt.
    pub offset: usize,
    /// Reads tool calls out of the text (a chat request with tools).
    tools: Option<ToolCallReader>,
    /// The prompt's log probabilities go first (legacy completions with `echo` and `logprobs`).
    pub prompt_logprobs: bool,
    /// Streamed: text sent at the head of the choice's first chunk (an echo that travels with
    /// the prompt's log probabilities, which come with the first token).
    pub lead: String,
}

impl Choice {
    /// Reads the choice's text for tool calls.
    pub fn read_tool_calls(mut self, reader: ToolCallReader) -> Self {
        self.tools = Some(reader);
        self
    }
}

/// Starts `n` choices of one prepared prompt; each extra choice samples with its own seed,
/// derived so that a seeded request stays reproducible.
pub async fn start(
    state: &AppState,
    prepared: Prepared,
    n: u32,
    first_index: u32,
    logprobs: bool,
) -> Result<Vec<Choice>, OpenAiError> {
    let mut choices = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut p = prepared.clone();
        if let Some(seed) = p.params.sampling.seed {
            p.params.sampling.seed = Some(seed.wrapping_add(u64::from(i)));
        }
        p.want_logprobs |= logprobs;
        choices.push(Choice {
            index: first_index + i,
            stream: state.infer.start(p).await?,
            logprobs,
            offset: 0,
            tools: None,
            prompt_logprobs: false,
            lead: String::new(),
        });
    }
    Ok(choices)
}

/// What a streamed choice yields.
enum ChoiceEvent {
    Delta {
        index: u32,
        text: String,
        calls: Vec<ToolDelta>,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    End {
        index: u32,
        text: String,
        calls: Vec<ToolDelta>,
        finish: &'static str,
        completion_tokens: u32,
        logprobs: Option<Vec<TokenLogprob>>,
        weight_version: String,
    },
    Error(RouterError),
}

/// A choice streamed piece by piece.
struct Streaming {
    choice: Choice,
    hold: usize,
    text: String,
    sent: usize,
    pending: Option<Vec<TokenLogprob>>,
    /// What passed the stop-sequence hold-back goes through it when the choice is read for
    /// tool calls: content, then each call's name and arguments.
    tools: Option<ToolCallStream>,
    /// The prompt's log probabilities are still to be put before the first token's.
    prompt_pending: bool,
    /// Text for the head of the first chunk, until it is sent.
    lead: Option<String>,
}

impl Streaming {
    fn new(mut choice: Choice, stops: &[String]) -> Self {
        Self {
            hold: StopSequences::new(stops.to_vec()).hold_back(),
            pending: choice.logprobs.then(Vec::new),
            tools: choice.tools.as_ref().map(ToolCallReader::stream),
            prompt_pending: choice.logprobs && choice.prompt_logprobs,
            lead: Some(std::mem::take(&mut choice.lead)).filter(|l| !l.is_empty()),
            choice,
            text: String::new(),
            sent: 0,
        }
    }

    async fn next(&mut self) -> Option<ChoiceEvent> {
        let mut ev = self.advance().await?;
        if let ChoiceEvent::Delta { text, .. } | ChoiceEvent::End { text, .. } = &mut ev {
            if let Some(lead) = self.lead.take() {
                text.insert_str(0, &lead);
            }
        }
        Some(ev)
    }

    async fn advance(&mut self) -> Option<ChoiceEvent> {
        loop {
            let ev = match self.choice.stream.next().await? {
                Ok(ev) => ev,
                Err(e) => return Some(ChoiceEvent::Error(e)),
            };
            if self.prompt_pending {
                // The first output brought them: they go out ahead of the first token's.
                if let (Some(prefill), Some(pending)) =
                    (self.choice.stream.prefill(), self.pending.as_mut())
                {
                    pending.extend(TokenLogprob::prompt(prefill));
                    self.prompt_pending = false;
                }
            }
            if let Some(token) = &ev.token {
                if let Some(pending) = self.pending.as_mut() {
                    pending.push(TokenLogprob::from_token(
                        token,
                        &ev.top_tokens,
                        self.choice.offset,
                    ));
                }
                if !token.special {
                    self.text.push_str(&token.text);
                    self.choice.offset += token.text.chars().count();
                }
            }
            if let Some(end) = ev.end {
                let mut rest = end
                    .text_before_stop()
                    .get(self.sent..)
                    .unwrap_or_default()
                    .to_string();
                let mut finish = finish_reason(end.finish_reason);
                let mut calls = Vec::new();
                if let Some(tools) = self.tools.as_mut() {
                    let mut d = tools.push(&rest);
                    let last = tools.finish();
                    d.content.push_str(&last.content);
                    d.calls.extend(last.calls);
                    rest = d.content;
                    calls = d.calls;
                    finish = with_calls(finish, tools.has_calls());
                }
                return Some(ChoiceEvent::End {
                    index: self.choice.index,
                    text: rest,
                    calls,
                    finish,
                    completion_tokens: end.generated_tokens,
                    logprobs: self.pending.as_mut().map(std::mem::take),
                    weight_version: end.weight_version,
                });
            }
            // Text that could still become a stop sequence is held back until it cannot.
            let upto = floor_char_boundary(&self.text, self.text.len().saturating_sub(self.hold))
                .max(self.sent);
            if upto > self.sent {
                let piece = &self.text[self.sent..upto];
                let (text, calls) = match self.tools.as_mut() {
                    None => (piece.to_string(), Vec::new()),
                    Some(tools) => {
                        let d = tools.push(piece);
                        (d.content, d.calls)
                    }
                };
                self.sent = upto;
                if text.is_empty() && calls.is_empty() {
                    // Held back as a possible tool call; its log probabilities wait with it.
                    continue;
                }
                return Some(ChoiceEvent::Delta {
                    index: self.choice.index,
                    text,
                    calls,
                    logprobs: self.pending.as_mut().map(std::mem::take),
                });
            }
        }
    }
}

/// A choice run to its end: how it is shown, its completion tokens, and the weight_version
/// of its last token.
type Finished = (FinishedChoice, u32, String);

/// Runs a choice to its end (the non-streaming answer).
async fn finish(choice: Choice) -> Result<Finished, RouterError> {
    let Choice {
        index,
        stream,
        logprobs,
        mut offset,
        tools,
        prompt_logprobs,
        lead: _,
    } = choice;
    let done = collect(stream).await?;
    let logprobs = logprobs.then(|| {
        let prompt = match (prompt_logprobs, done.prefill.as_deref()) {
            (true, Some(prefill)) => TokenLogprob::prompt(prefill),
            _ => Vec::new(),
        };
        let generated = done.tokens.iter().enumerate().map(|(i, t)| {
            let top = done.top_tokens.get(i).map(Vec::as_slice).unwrap_or(&[]);
            let entry = TokenLogprob::from_token(t, top, offset);
            if !t.special {
                offset += t.text.chars().count();
            }
            entry
        });
        prompt.into_iter().chain(generated).collect()
    });
    let text = done.end.text_before_stop();
    let finish = finish_reason(done.end.finish_reason);
    let (text, tool_calls, finish) = match tools {
        None => (text.to_string(), Vec::new(), finish),
        Some(reader) => {
            let parsed = reader.parse(text);
            let called = !parsed.calls.is_empty();
            (
                parsed.content.unwrap_or_default(),
                parsed.calls,
                with_calls(finish, called),
            )
        }
    };
    Ok((
        FinishedChoice {
            index,
            text,
            finish,
            logprobs,
            tool_calls,
        },
        done.end.generated_tokens,
        done.end.weight_version,
    ))
}

/// Fields every answer of one request shares.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
    /// Prompt tokens counted once per prompt (not per choice).
    pub prompt_tokens: u32,
}

impl Meta {
    pub fn new(state: &AppState, prefix: &str, prompt_tokens: u32) -> Self {
        Self {
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model: state.info.model_id.clone(),
            fingerprint: format!("tensorgate-{}-{}", state.info.version, state.info.engine),
            prompt_tokens,
        }
    }

    fn body(&self, object: &str, choices: Value, usage: Value) -> Value {
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": self.fingerprint, "choices": choices, "usage": usage,
        })
    }

    /// A body with tensorgate's `weight_version` extension (RL rollouts): the label of the
    /// weights that produced the answer's last token.
    fn body_with_version(
        &self,
        object: &str,
        choices: Value,
        usage: Value,
        version: &str,
    ) -> Value {
        let mut body = self.body(object, choices, usage);
        body["weight_version"] = json!(version);
        body
    }

    fn usage(&self, completion_tokens: u32) -> Value {
        json!(Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
        })
    }
}

/// What every streamed chunk of one answer shares, rendered once: the fields before
/// `choices` (as `Meta::body` orders them). A chunk is then this head, its choices, and the
/// fields after.
struct ChunkTemplate {
    head: Vec<u8>,
}

impl ChunkTemplate {
    fn new(meta: &Meta, object: &str) -> Self {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"{\"id\":");
        write_json_str(&mut head, &meta.id);
        head.extend_from_slice(b",\"object\":");
        write_json_str(&mut head, object);
        head.extend_from_slice(b",\"created\":");
        head.extend_from_slice(itoa::Buffer::new().format(meta.created).as_bytes());
        head.extend_from_slice(b",\"model\":");
        write_json_str(&mut head, &meta.model);
        head.extend_from_slice(b",\"system_fingerprint\":");
        write_json_str(&mut head, &meta.fingerprint);
        head.extend_from_slice(b",\"choices\":[");
        Self { head }
    }

    /// A chunk of one text-only choice without usage: `Meta::body(object, [choice], null)`.
    fn text_chunk<F: Family>(&self, family: &F, index: u32, text: &str) -> String {
        let mut out = Vec::with_capacity(self.head.len() + text.len() + 96);
        out.extend_from_slice(&self.head);
        family.write_text_choice(&mut out, index, text);
        out.extend_from_slice(b"],\"usage\":null}");
        // Only JSON text went in: valid UTF-8 (the lossy path is never taken).
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// `value` as a JSON string, escaped as serde_json escapes it everywhere else.
pub fn write_json_str(out: &mut Vec<u8>, value: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(out, value);
}

/// The answer to an OpenAI request: the whole JSON body, or the SSE stream when `stream`.
pub async fn respond<F: Family>(
    family: F,
    meta: Meta,
    choices: Vec<Choice>,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
) -> Result<Response, OpenAiError> {
    if !stream {
        let done = futures::future::try_join_all(choices.into_iter().map(finish)).await?;
        let completion: u32 = done.iter().map(|(_, n, _)| n).sum();
        // Choices of one request cannot straddle an update (updates wait for or abort every
        // request in flight), so one label serves them all; the last choice's is taken.
        let version = done.last().map(|(_, _, v)| v.clone()).unwrap_or_default();
        let choices: Vec<Value> = done
            .into_iter()
            .map(|(c, _, _)| family.full_choice(c))
            .collect();
        let body =
            meta.body_with_version(F::OBJECT, json!(choices), meta.usage(completion), &version);
        return Ok(Json(body).into_response());
    }
    let n = choices.len() as u32;
    let prelude = family.prelude(n);
    let template = ChunkTemplate::new(&meta, F::CHUNK_OBJECT);
    let events = async_stream::stream! {
        for choices in prelude {
            yield Ok::<_, Infallible>(sse_json(&meta.body(F::CHUNK_OBJECT, choices, Value::Null)));
        }
        let mut completion = 0u32;
        let mut version = String::new();
        let mut events = Box::pin(choice_stream(choices, &stops));
        while let Some(ev) = events.next().await {
            let chunk = match ev {
                ChoiceEvent::Delta { index, text, calls, logprobs: None } if calls.is_empty() => {
                    yield Ok(Event::default().data(template.text_chunk(&family, index, &text)));
                    continue;
                }
                ChoiceEvent::Delta { index, text, calls, logprobs } if calls.is_empty() => {
                    let choice = family.chunk_choice(index, &text, logprobs.as_deref(), None);
                    meta.body(F::CHUNK_OBJECT, json!([choice]), Value::Null)
                }
                ChoiceEvent::Delta { index, text, calls, logprobs } => {
                    let choice = family.tool_chunk_choice(index, &text, &calls, logprobs.as_deref(), None);
                    meta.body(F::CHUNK_OBJECT, json!([choice]), Value::Null)
                }
                ChoiceEvent::End { index, text, calls, finish, completion_tokens, logprobs, weight_version } => {
                    completion += completion_tokens;
                    let choice = family.tool_chunk_choice(index, &text, &calls, logprobs.as_deref(), Some(finish));
                    // Each choice's finishing chunk says which weights produced it.
                    version = weight_version;
                    meta.body_with_version(F::CHUNK_OBJECT, json!([choice]), Value::Null, &version)
                }
                ChoiceEvent::Error(e) => {
                    e.log();
                    yield Ok(sse_json(&serde_json::to_value(e.openai_body()).unwrap_or_default()));
                    return;
                }
            };
            yield Ok(sse_json(&chunk));
        }
        if include_usage {
            yield Ok(sse_json(&meta.body_with_version(F::CHUNK_OBJECT, json!([]), meta.usage(completion), &version)));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The events of every choice as they come. One choice (nearly every request) is read
/// directly: merging a single stream through `select_all` costs a task-set poll per token.
fn choice_stream(choices: Vec<Choice>, stops: &[String]) -> impl Stream<Item = ChoiceEvent> {
    let mut streams: Vec<_> = choices
        .into_iter()
        .map(|c| {
            Box::pin(stream::unfold(
                Some(Streaming::new(c, stops)),
                |c| async move {
                    let mut c = c?;
                    let ev = c.next().await?;
                    let done = matches!(ev, ChoiceEvent::End { .. } | ChoiceEvent::Error(_));
                    Some((ev, if done { None } else { Some(c) }))
                },
            ))
        })
        .collect();
    if streams.len() == 1 {
        if let Some(only) = streams.pop() {
            return only.left_stream();
        }
    }
    stream::select_all(streams).right_stream()
}

fn sse_json(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Strings whose JSON escaping differs from their text.
    pub(crate) const TRICKY: &[&str] = &[
        "",
        "plain",
        "quote \" and \\ backslash",
        "line\nbreak\ttab\r",
        "\u{0}\u{1f}\u{7f} controls",
        "ünï 日本 🦀",
        "</script>",
        "\u{2028}\u{2029}",
    ];

    /// The same chunk two ways: the template, and `Meta::body` over `chunk_choice`.
    pub(crate) fn text_chunk_both_ways<F: Family>(
        family: &F,
        index: u32,
        text: &str,
    ) -> (String, String) {
        let meta = Meta {
            id: "chatcmpl-\"odd\"".into(),
            created: 1_795_903_572,
            model: "org/model \"q\" ü".into(),
            fingerprint: "tensorgate-0.1.0-synthetic".into(),
            prompt_tokens: 3,
        };
        let template = ChunkTemplate::new(&meta, F::CHUNK_OBJECT);
        let tree = meta
            .body(
                F::CHUNK_OBJECT,
                json!([family.chunk_choice(index, text, None, None)]),
                Value::Null,
            )
            .to_string();
        (template.text_chunk(family, index, text), tree)
    }
}
