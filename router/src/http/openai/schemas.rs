//! Request bodies of the OpenAI routes (responses are built as JSON in `chat` and
//! `completions`, in OpenAI's documented shapes).

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// `/v1/completions` `prompt`: OpenAI's four forms (text, texts, token ids, lists of ids).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// One prompt of a completions request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    /// Token ids, sent to the engine as they are (token-exact: no re-tokenization).
    Ids(Vec<u32>),
}

impl PromptInput {
    pub fn into_prompts(self) -> Vec<Prompt> {
        match self {
            PromptInput::Text(s) => vec![Prompt::Text(s)],
            PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptInput::Ids(ids) => vec![Prompt::Ids(ids)],
            PromptInput::IdLists(v) => v.into_iter().map(Prompt::Ids).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, utoipa::ToSchema)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A string, or a list of parts whose errors name the part's field (`[0].text: ...`): serde's
/// untagged enums would only say that no variant matched.
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(MessageContent::Text(s)),
            parts @ Value::Array(_) => serde_path_to_error::deserialize(parts)
                .map(MessageContent::Parts)
                .map_err(|e| {
                    // `[0].text` → "`text` of content part [0]": the outer path (messages[i].
                    // content) is serde's, and a field named in quotes reads on its own.
                    let path = e.path().to_string();
                    let (part, field) = path.rsplit_once('.').unwrap_or((path.as_str(), ""));
                    D::Error::custom(if field.is_empty() {
                        format!("content part {part}: {}", e.inner())
                    } else {
                        format!("`{field}` of content part {part}: {}", e.inner())
                    })
                }),
            other => Err(D::Error::custom(format!(
                "expected a string or a list of content parts, got {}",
                json_kind(&other)
            ))),
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant's calls, as answers give them (`arguments` as JSON text).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Value>,
    /// On a `tool` message: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
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
    #[serde(
        default,
        deserialize_with = "crate::http::extract::strict::optional_object"
    )]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<StringOrList>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    /// tensorgate extension (TGI's and vLLM's name): HF repetition penalty, > 0; 1 is off.
    /// TGI's own Python client sends it (as null when unset) on chat requests.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub user: Option<String>,
    /// Token id (as a string) → bias in [-100, 100] added to its logit.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// `text` (unconstrained), `json_object`, or `json_schema` with `{name, schema, strict}`:
    /// enforced token by token by the engine's grammar backend.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// tensorgate extension (vLLM's name): output that validates against this JSON schema.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<Value>,
    /// tensorgate extension (vLLM's name): output that matches this regular expression.
    #[serde(default)]
    pub guided_regex: Option<String>,
    /// tensorgate extension (vLLM's name): output that is exactly one of these strings.
    #[serde(default)]
    pub guided_choice: Option<Vec<String>>,
    /// tensorgate extension (vLLM's name): output in this context-free grammar (llguidance's
    /// Lark syntax).
    #[serde(default)]
    pub guided_grammar: Option<String>,
    /// tensorgate extension (vLLM's name): end-of-sequence cannot end the output before this
    /// many tokens.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub min_tokens: Option<i64>,
    /// tensorgate extension (vLLM's name): token ids that end the output.
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// tensorgate extension (vLLM's name): generate past end-of-sequence.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// tensorgate extension (as vLLM's): admission priority, higher first.
    #[serde(default)]
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(deserialize_with = "crate::http::extract::strict::objects")]
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
    /// Functions the model may call: `[{"type": "function", "function": {"name",
    /// "description", "parameters": <JSON schema>}}]`, shown to it by the chat template.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `none`, `auto` (default with tools), `required`, or `{"type": "function", "function":
    /// {"name": ...}}`; `required` and a named function are enforced by a grammar.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// Default true; false: at most one call per answer.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    // Flattened last: serde's deny_unknown_fields sees the flattened fields as known.
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptInput,
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

/// A request body that failed to deserialize with no field in serde's message: the fields of
/// `CommonParams` are flattened into both request kinds, and serde's flatten loses the path.
/// Finds the top-level field that fails on its own and names it (`n: invalid type: ...`).
pub fn name_common_field(body: &[u8]) -> Option<String> {
    let map: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
    map.into_iter().find_map(|(k, v)| {
        let one = Value::Object(std::iter::once((k.clone(), v)).collect());
        serde_json::from_value::<CommonParams>(one)
            .err()
            .map(|e| format!("{k}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flattened_field_is_named() {
        for (body, needle) in [
            (
                r#"{"messages": [], "n": "2"}"#,
                "n: invalid type: string \"2\", expected u32",
            ),
            (
                r#"{"prompt": "x", "stop": 5}"#,
                "stop: a string or a list of strings",
            ),
            (r#"{"prompt": "x", "seed": -1}"#, "seed: invalid value"),
            (r#"{"prompt": "x", "user": 5}"#, "user: invalid type"),
        ] {
            let named = name_common_field(body.as_bytes()).expect(body);
            assert!(named.starts_with(needle), "{body}: {named}");
        }
        assert_eq!(name_common_field(br#"{"prompt": "x", "n": 2}"#), None);
        assert_eq!(name_common_field(b"{"), None);
    }

    #[test]
    fn content_part_errors_name_the_part_field() {
        let e = serde_json::from_str::<MessageContent>(r#"[{"type": "text", "text": 5}]"#)
            .expect_err("int text");
        assert!(
            e.to_string()
                .starts_with("`text` of content part [0]: invalid type"),
            "{e}"
        );
        let e = serde_json::from_str::<MessageContent>(r#"[{"text": "Hi"}]"#).expect_err("no type");
        assert!(e.to_string().contains("missing field `type`"), "{e}");
        let e = serde_json::from_str::<MessageContent>("5").expect_err("int");
        assert!(
            e.to_string()
                .contains("a string or a list of content parts"),
            "{e}"
        );
        assert!(serde_json::from_str::<ChatMessageIn>(
            r#"{"role": "user", "content": "x", "bogus": 1}"#
        )
        .expect_err("unknown")
        .to_string()
        .contains("unknown field `bogus`"));
    }
}
