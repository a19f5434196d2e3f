//! `POST /v1/chat/completions`.

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};

use crate::errors::{OpenAiError, RouterError};
use crate::generation::chat_template::ChatTemplate;
use crate::generation::requests::RequestId;
use crate::generation::tool_parsers::ToolDelta;
use crate::generation::validation::ValidationError;
use crate::http::extract::OpenAiJson;
use crate::http::openai::choices::{self, Family, FinishedChoice, Meta};
use crate::http::openai::logprobs::{self, TokenLogprob};
use crate::http::openai::mapping::{check_n, record_user, to_generate_parameters, unsupported};
use crate::http::openai::schemas::ChatCompletionRequest;
use crate::http::openai::tools::{chat_messages, tool_setup, ToolSetup};
use crate::http::responses::OpenAiErrors;
use crate::http::state::AppState;

struct Chat;

impl Family for Chat {
    const OBJECT: &'static str = "chat.completion";
    const CHUNK_OBJECT: &'static str = "chat.completion.chunk";

    fn full_choice(&self, c: FinishedChoice) -> Value {
        let message = if c.tool_calls.is_empty() {
            json!({"role": "assistant", "content": c.text})
        } else {
            let calls: Vec<Value> = c
                .tool_calls
                .iter()
                .map(|t| json!({"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
                .collect();
            let content = (!c.text.is_empty()).then_some(c.text);
            json!({"role": "assistant", "content": content, "tool_calls": calls})
        };
        json!({
            "index": c.index,
            "message": message,
            "logprobs": c.logprobs.as_deref().map(logprobs::chat),
            "finish_reason": c.finish,
        })
    }

    /// OpenAI's incremental calls: a call's first entry has its id, type and name (and
    /// `arguments: ""`), later ones only more of its `arguments`; entries of one chunk that
    /// belong to the same call are merged.
    fn tool_chunk_choice(
        &self,
        index: u32,
        text: &str,
        calls: &[ToolDelta],
        lp: Option<&[TokenLogprob]>,
        finish: Option<&str>,
    ) -> Value {
        let mut entries: Vec<Value> = Vec::new();
        let mut last: Option<usize> = None;
        for d in calls {
            match d {
                ToolDelta::Call { index, id, name } => {
                    entries.push(json!({"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}));
                    last = Some(*index);
                }
                ToolDelta::Arguments { index, fragment } => {
                    let merged = (last == Some(*index))
                        .then(|| entries.last_mut())
                        .flatten()
                        .and_then(|e| e.pointer_mut("/function/arguments"));
                    match merged {
                        Some(Value::String(args)) => args.push_str(fragment),
                        _ => {
                            entries
                                .push(json!({"index": index, "function": {"arguments": fragment}}));
                            last = Some(*index);
                        }
                    }
                }
            }
        }
        let mut delta = serde_json::Map::new();
        if !text.is_empty() || entries.is_empty() {
            delta.insert("content".into(), Value::String(text.to_string()));
        }
        if !entries.is_empty() {
            delta.insert("tool_calls".into(), Value::Array(entries));
        }
        json!({"index": index, "delta": delta, "logprobs": lp.map(logprobs::chat), "finish_reason": finish})
    }

    fn chunk_choice(
        &self,
        index: u32,
        text: &str,
        lp: Option<&[TokenLogprob]>,
        finish: Option<&str>,
    ) -> Value {
        json!({"index": index, "delta": {"content": text}, "logprobs": lp.map(logprobs::chat), "finish_reason": finish})
    }

    fn write_text_choice(&self, out: &mut Vec<u8>, index: u32, text: &str) {
        out.extend_from_slice(b"{\"index\":");
        out.extend_from_slice(itoa::Buffer::new().format(index).as_bytes());
        out.extend_from_slice(b",\"delta\":{\"content\":");
        choices::write_json_str(out, text);
        out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":null}");
    }

    fn prelude(&self, n: u32) -> Vec<Value> {
        let roles: Vec<Value> = (0..n)
            .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
            .collect();
        vec![json!(roles)]
    }
}

/// The request's messages (and tools) through the model's chat template: the prompt it
/// generates from (also what `/chat_tokenize` shows).
pub fn render_prompt(state: &AppState, req: &ChatCompletionRequest) -> Result<String, OpenAiError> {
    let template = chat_template(state, req)?;
    let tools = tool_setup(req, template.tool_call_format())?;
    render(template, req, &tools)
}

/// The model's chat template, for a request with messages.
fn chat_template<'a>(
    state: &'a AppState,
    req: &ChatCompletionRequest,
) -> Result<&'a ChatTemplate, OpenAiError> {
    if req.messages.is_empty() {
        return Err(ValidationError::OutOfRange {
            name: "messages",
            bounds: "a non-empty list",
            value: "[]".into(),
        }
        .into());
    }
    state.infer.chat_template().ok_or_else(|| {
        unsupported(
            "messages",
            "the model has no chat template; use /v1/completions",
        )
    })
}

fn render(
    template: &ChatTemplate,
    req: &ChatCompletionRequest,
    tools: &ToolSetup,
) -> Result<String, OpenAiError> {
    let messages = chat_messages(req)?;
    Ok(template
        .render_with_tools(&messages, tools.template_tools.as_ref(), true)
        .map_err(RouterError::Template)?)
}

/// A chat request has no `prompt`: a prompt-length error names `messages`, whose rendering
/// the prompt is.
fn name_messages(e: RouterError) -> RouterError {
    match e {
        RouterError::Validation(ValidationError::InputLength { max, given }) => {
            ValidationError::OutOfRange {
                name: "messages",
                bounds: "fewer than max_input_tokens tokens once rendered by the chat template",
                value: format!("{given} tokens (max_input_tokens is {max})"),
            }
            .into()
        }
        RouterError::Validation(ValidationError::TotalLength { max, input, new }) => {
            ValidationError::OutOfRange {
                name: "max_tokens",
                bounds: "such that the rendered `messages` tokens + max_tokens <= max_total_tokens",
                value: format!("{new} with {input} message tokens (max_total_tokens is {max})"),
            }
            .into()
        }
        other => other,
    }
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI", request_body = ChatCompletionRequest, responses((status = 200, description = "chat.completion, or chat.completion.chunk events when stream is true", body = Object), OpenAiErrors))]
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    OpenAiJson(req): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, OpenAiError> {
    let want_logprobs = req.logprobs == Some(true);
    if req.top_logprobs.is_some_and(|n| n > 0) && !want_logprobs {
        return Err(ValidationError::OutOfRange {
            name: "top_logprobs",
            bounds: "used only with `logprobs: true`",
            value: req.top_logprobs.unwrap_or(0).to_string(),
        }
        .into());
    }
    if want_logprobs && !state.infer.features().logprobs {
        return Err(unsupported(
            "logprobs",
            "the engine does not return log probabilities",
        ));
    }
    let n = check_n(req.common.n)?;
    let template = chat_template(&state, &req)?;
    let tools = tool_setup(&req, template.tool_call_format())?;
    let prompt = render(template, &req, &tools)?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let mut params = to_generate_parameters(&req.common, max_tokens)?;
    params.top_n_tokens = req.top_logprobs.filter(|_| want_logprobs);
    if let Some(grammar) = tools.grammar {
        if let Some((_, other)) = &params.guided {
            return Err(ValidationError::Grammar {
                field: "tool_choice",
                reason: format!(
                    "only one constraint per request; given {other} and a forced tool call"
                ),
            }
            .into());
        }
        // Validation refuses it (422) where the engine has no grammar backend.
        params.guided = Some((grammar, "tool_choice"));
    }
    let mut prepared = state
        .infer
        .prepare_prompt(prompt, false, &params)
        .await
        .map_err(name_messages)?;
    prepared.request_id = Some(rid);
    record_user("/v1/chat/completions", &req.common);
    let stops = prepared.params.stop_sequences.clone();
    let meta = Meta::new(&state, "chatcmpl", prepared.input_ids.len() as u32);
    let mut choices = choices::start(&state, prepared, n, 0, want_logprobs).await?;
    if let Some(reader) = tools.reader {
        choices = choices
            .into_iter()
            .map(|c| c.read_tool_calls(reader.clone()))
            .collect();
    }
    let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
    choices::respond(Chat, meta, choices, stops, req.common.stream, include_usage).await
}

#[cfg(test)]
mod tests {
    use crate::http::openai::choices::tests::{text_chunk_both_ways, TRICKY};
    use proptest::prelude::*;

    #[test]
    fn text_chunks_render_as_the_json_tree() {
        for (i, text) in TRICKY.iter().enumerate() {
            let (fast, tree) = text_chunk_both_ways(&Chat, i as u32, text);
            assert_eq!(fast, tree);
        }
    }

    proptest! {
        #[test]
        fn any_text_chunk_renders_as_the_json_tree(text in any::<String>(), index in any::<u32>()) {
            let (fast, tree) = text_chunk_both_ways(&Chat, index, &text);
            prop_assert_eq!(fast, tree);
        }
    }

    use super::*;
    use crate::generation::tool_parsers::{ToolCallFormat, ToolCallReader};

    /// The chunks of a streamed answer, assembled as OpenAI's clients do: content appended,
    /// each `tool_calls` entry merged into the call of its `index`.
    fn assemble(chunks: &[Value]) -> (String, Vec<(String, String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for c in chunks {
            let delta = &c["delta"];
            if let Some(t) = delta["content"].as_str() {
                content.push_str(t);
            }
            for e in delta["tool_calls"].as_array().into_iter().flatten() {
                let i = e["index"].as_u64().expect("index") as usize;
                if i == calls.len() {
                    assert_eq!(e["type"], "function", "a call's first entry has its type");
                    calls.push((
                        e["id"].as_str().expect("first entry has the id").into(),
                        e["function"]["name"].as_str().expect("and the name").into(),
                        String::new(),
                    ));
                } else {
                    assert!(e.get("id").is_none() && e["function"].get("name").is_none());
                }
                calls[i].2 += e["function"]["arguments"].as_str().expect("arguments");
            }
        }
        (content, calls)
    }

    #[test]
    fn streamed_tool_calls_assemble_to_the_whole_answer() {
        let text = "Checking both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let reader = ToolCallReader::new(
            ToolCallFormat::Hermes,
            ["get_weather".to_string(), "get_time".to_string()],
            true,
        );
        let parsed = reader.parse(text);
        let whole = Chat.full_choice(FinishedChoice {
            index: 0,
            text: parsed.content.clone().unwrap_or_default(),
            finish: "tool_calls",
            logprobs: None,
            tool_calls: parsed.calls.clone(),
        });
        let message = &whole["message"];
        assert_eq!(message["content"], "Checking both.");
        assert_eq!(message["tool_calls"][0]["type"], "function");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            "{\"city\": \"Paris\"}"
        );
        for step in [1, 4, 9, 500] {
            let mut s = reader.stream();
            let mut chunks = Vec::new();
            let bytes: Vec<char> = text.chars().collect();
            for piece in bytes.chunks(step) {
                let piece: String = piece.iter().collect();
                let d = s.push(&piece);
                if !d.is_empty() {
                    chunks.push(Chat.tool_chunk_choice(0, &d.content, &d.calls, None, None));
                }
            }
            let d = s.finish();
            chunks.push(Chat.tool_chunk_choice(0, &d.content, &d.calls, None, Some("tool_calls")));
            let (content, calls) = assemble(&chunks);
            assert_eq!(content, "Checking both.", "step {step}");
            let want: Vec<(String, String)> = parsed
                .calls
                .iter()
                .map(|c| (c.name.clone(), c.arguments.clone()))
                .collect();
            let got: Vec<(String, String)> = calls.into_iter().map(|(_, n, a)| (n, a)).collect();
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn an_answer_with_only_calls_has_null_content() {
        let reader = ToolCallReader::new(ToolCallFormat::Mistral, ["f".to_string()], true);
        let parsed = reader.parse(" [{\"name\": \"f\", \"arguments\": {\"a\": 1}}]");
        let whole = Chat.full_choice(FinishedChoice {
            index: 0,
            text: parsed.content.unwrap_or_default(),
            finish: "tool_calls",
            logprobs: None,
            tool_calls: parsed.calls,
        });
        assert!(whole["message"]["content"].is_null());
        assert_eq!(whole["finish_reason"], "tool_calls");
        let id = whole["message"]["tool_calls"][0]["id"]
            .as_str()
            .expect("id");
        assert_eq!(id.len(), 9, "Mistral's template takes 9-character ids back");
        // A plain chunk keeps its `content` even when empty (the last one of a choice).
        let last = Chat.tool_chunk_choice(0, "", &[], None, Some("stop"));
        assert_eq!(last["delta"], json!({"content": ""}));
    }
}
