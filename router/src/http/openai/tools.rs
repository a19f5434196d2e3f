//! The tool fields of a chat request, checked: `tools` and `tool_choice` become what the
//! chat template shows, how the answers are read (`ToolCallReader`) and, for `required` or a
//! named function, the grammar that forces the call; messages with `tool_calls` or a
//! `tool_call_id` become template messages as transformers takes them.

use serde_json::Value;

use crate::errors::OpenAiError;
use crate::generation::chat_template::ChatMessage;
use crate::generation::guided::GrammarSpec;
use crate::generation::tool_parsers::grammar::{tool_grammar, FunctionSchema};
use crate::generation::tool_parsers::{ToolCallFormat, ToolCallReader};
use crate::generation::validation::ValidationError;
use crate::http::openai::mapping::message_text;
use crate::http::openai::schemas::{ChatCompletionRequest, ChatMessageIn};

/// What a request's tool fields ask for.
#[derive(Debug, Default)]
pub struct ToolSetup {
    /// The `tools` the chat template shows (none with `tool_choice: "none"`).
    pub template_tools: Option<Value>,
    /// Reads calls out of the answers; `None`: the answers are text.
    pub reader: Option<ToolCallReader>,
    /// Forces calls: `tool_choice` `required` or a named function.
    pub grammar: Option<GrammarSpec>,
}

fn invalid(field: &'static str, reason: String) -> OpenAiError {
    ValidationError::Invalid { field, reason }.into()
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `tools`: a non-empty list of `{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}` with distinct names.
fn functions(tools: &Value) -> Result<Vec<FunctionSchema>, OpenAiError> {
    let list = tools.as_array().ok_or_else(|| {
        invalid(
            "tools",
            "expected a list of {\"type\": \"function\", \"function\": {...}}".into(),
        )
    })?;
    if list.is_empty() {
        return Err(invalid(
            "tools",
            "the list is empty; leave `tools` out for none".into(),
        ));
    }
    let mut out: Vec<FunctionSchema> = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid(
                "tools",
                format!("tools[{i}].type must be \"function\" (the only kind served)"),
            ));
        }
        let f = tool
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| invalid("tools", format!("tools[{i}].function must be an object")))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(invalid(
                "tools",
                format!(
                    "tools[{i}].function.name must be 1 to 64 letters, digits, underscores or dashes, got {}",
                    f.get("name").unwrap_or(&Value::Null)
                ),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(invalid(
                "tools",
                format!("tools[{i}].function.name: `{name}` is defined twice"),
            ));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => None,
            Some(p) if p.is_object() => Some(p.clone()),
            Some(_) => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON schema object"),
                ))
            }
        };
        if f.get("description")
            .is_some_and(|d| !d.is_string() && !d.is_null())
        {
            return Err(invalid(
                "tools",
                format!("tools[{i}].function.description must be a string"),
            ));
        }
        out.push(FunctionSchema::new(name.to_string(), parameters));
    }
    Ok(out)
}

/// What `tool_choice` says.
enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

fn tool_choice(v: Option<&Value>, have_tools: bool) -> Result<Choice, OpenAiError> {
    let bad = || {
        invalid(
            "tool_choice",
            "expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
        )
    };
    let choice = match v {
        None | Some(Value::Null) => {
            return Ok(if have_tools {
                Choice::Auto
            } else {
                Choice::None
            })
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            _ => return Err(bad()),
        },
        Some(obj @ Value::Object(_)) => {
            if obj.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad());
            }
            let name = obj
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            Choice::Named(name.to_string())
        }
        Some(_) => return Err(bad()),
    };
    if !have_tools && !matches!(choice, Choice::None) {
        return Err(invalid(
            "tool_choice",
            "needs `tools` (the functions it may call)".into(),
        ));
    }
    Ok(choice)
}

/// Checks the tool fields of `req`, for a model that writes calls in `format`.
pub fn tool_setup(
    req: &ChatCompletionRequest,
    format: ToolCallFormat,
) -> Result<ToolSetup, OpenAiError> {
    let tools = req.tools.as_ref().filter(|t| !t.is_null());
    let functions = tools.map(functions).transpose()?.unwrap_or_default();
    let choice = tool_choice(req.tool_choice.as_ref(), tools.is_some())?;
    // A named function is called once (as OpenAI and vLLM answer it); `required` may call
    // several unless `parallel_tool_calls` is false.
    let parallel = req.parallel_tool_calls.unwrap_or(true) && !matches!(choice, Choice::Named(_));
    let forced: Vec<FunctionSchema> = match &choice {
        Choice::None => return Ok(ToolSetup::default()),
        Choice::Auto => Vec::new(),
        Choice::Required => functions.clone(),
        Choice::Named(name) => {
            let f = functions.iter().find(|f| &f.name == name).ok_or_else(|| {
                let offered: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
                invalid(
                    "tool_choice",
                    format!(
                        "names function `{name}`, which is not in `tools` ({})",
                        offered.join(", ")
                    ),
                )
            })?;
            vec![f.clone()]
        }
    };
    Ok(ToolSetup {
        template_tools: tools.cloned(),
        reader: Some(ToolCallReader::new(
            format,
            functions.iter().map(|f| f.name.clone()),
            parallel,
        )),
        grammar: (!forced.is_empty()).then(|| tool_grammar(format, &forced, parallel)),
    })
}

/// The request's messages as the chat template takes them.
pub fn chat_messages(req: &ChatCompletionRequest) -> Result<Vec<ChatMessage>, OpenAiError> {
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| chat_message(i, m))
        .collect()
}

fn chat_message(i: usize, m: &ChatMessageIn) -> Result<ChatMessage, OpenAiError> {
    let tool_call_id = match (m.role.as_str(), &m.tool_call_id) {
        ("tool", None) => {
            return Err(invalid(
                "messages",
                format!("messages[{i}].tool_call_id is required on a `tool` message (the id of the call it answers)"),
            ))
        }
        ("tool", Some(id)) => Some(id.clone()),
        (_, Some(_)) => {
            return Err(invalid(
                "messages",
                format!("messages[{i}].tool_call_id belongs on `tool` messages only"),
            ))
        }
        (_, None) => None,
    };
    let tool_calls = match (&m.tool_calls, m.role.as_str()) {
        (None | Some(Value::Null), _) => None,
        (Some(calls), "assistant") => Some(assistant_calls(i, calls)?),
        (Some(_), _) => {
            return Err(invalid(
                "messages",
                format!("messages[{i}].tool_calls belongs on `assistant` messages only"),
            ))
        }
    };
    Ok(ChatMessage {
        role: m.role.clone(),
        content: message_text(m)?,
        name: m.name.clone(),
        tool_calls,
        tool_call_id,
    })
}

/// An assistant's `tool_calls` as transformers takes them: the arguments as an object
/// where the JSON text is one (templates write them with `tojson`).
fn assistant_calls(i: usize, calls: &Value) -> Result<Vec<Value>, OpenAiError> {
    let list = calls.as_array().ok_or_else(|| {
        invalid(
            "messages",
            format!("messages[{i}].tool_calls must be a list"),
        )
    })?;
    list.iter()
        .enumerate()
        .map(|(j, call)| {
            let at = format!("messages[{i}].tool_calls[{j}]");
            let name = call
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid("messages", format!("{at}.function.name must be a string"))
                })?;
            let arguments = match call.pointer("/function/arguments") {
                Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| Value::String(s.clone())),
                Some(obj @ Value::Object(_)) => obj.clone(),
                _ => {
                    return Err(invalid(
                        "messages",
                        format!("{at}.function.arguments must be a JSON string"),
                    ))
                }
            };
            let mut out = serde_json::Map::new();
            if let Some(id) = call.get("id").filter(|id| !id.is_null()) {
                let id = id
                    .as_str()
                    .ok_or_else(|| invalid("messages", format!("{at}.id must be a string")))?;
                out.insert("id".into(), Value::String(id.into()));
            }
            out.insert("type".into(), Value::String("function".into()));
            out.insert(
                "function".into(),
                serde_json::json!({"name": name, "arguments": arguments}),
            );
            Ok(Value::Object(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: Value) -> ChatCompletionRequest {
        serde_json::from_value(body).expect("request")
    }

    fn weather() -> Value {
        serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    fn setup(body: Value) -> Result<ToolSetup, String> {
        tool_setup(&req(body), ToolCallFormat::Hermes).map_err(|e| e.0.to_string())
    }

    #[test]
    fn choices_map_to_template_reader_and_grammar() {
        let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
        let s = setup(serde_json::json!({"messages": msgs, "tools": weather()})).expect("auto");
        assert!(s.template_tools.is_some() && s.reader.is_some() && s.grammar.is_none());
        let s =
            setup(serde_json::json!({"messages": msgs, "tools": weather(), "tool_choice": "none"}))
                .expect("none");
        assert!(s.template_tools.is_none() && s.reader.is_none() && s.grammar.is_none());
        let s = setup(
            serde_json::json!({"messages": msgs, "tools": weather(), "tool_choice": "required"}),
        )
        .expect("required");
        assert!(matches!(s.grammar, Some(GrammarSpec::Lark(_))));
        let s = setup(serde_json::json!({"messages": msgs, "tools": weather(),
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .expect("named");
        let Some(GrammarSpec::Lark(lark)) = s.grammar else {
            panic!("a Lark grammar")
        };
        assert!(
            lark.starts_with("start: call\n"),
            "one call of a named function: {lark}"
        );
        let s = setup(serde_json::json!({"messages": msgs})).expect("no tools");
        assert!(s.reader.is_none());
    }

    #[test]
    fn malformed_tool_fields_name_the_field() {
        let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
        for (extra, needle) in [
            (
                serde_json::json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "`tool_choice` is invalid: names function `nope`",
            ),
            (
                serde_json::json!({"tools": weather(), "tool_choice": "sometimes"}),
                "`tool_choice` is invalid",
            ),
            (
                serde_json::json!({"tool_choice": "required"}),
                "`tool_choice` is invalid: needs `tools`",
            ),
            (
                serde_json::json!({"tools": {"name": "f"}}),
                "`tools` is invalid",
            ),
            (
                serde_json::json!({"tools": []}),
                "`tools` is invalid: the list is empty",
            ),
            (
                serde_json::json!({"tools": [{"type": "retrieval"}]}),
                "tools[0].type",
            ),
            (
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
                "tools[0].function.parameters",
            ),
            (
                serde_json::json!({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}),
                "tools[1].function.name: `f` is defined twice",
            ),
        ] {
            let mut body = extra.clone();
            body["messages"] = msgs.clone();
            let e = setup(body)
                .err()
                .unwrap_or_else(|| panic!("{extra} passed"));
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn tool_messages_become_template_messages() {
        let r = req(serde_json::json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        ]}));
        let m = chat_messages(&r).ok().expect("valid");
        assert_eq!(m[1].content, "");
        assert_eq!(
            m[1].tool_calls.as_ref().expect("calls")[0],
            serde_json::json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})
        );
        assert_eq!(m[2].tool_call_id.as_deref(), Some("call_1"));
        let r = req(serde_json::json!({"messages": [{"role": "tool", "content": "22 C"}]}));
        let e = chat_messages(&r).expect_err("no id").0.to_string();
        assert!(e.contains("messages[0].tool_call_id is required"), "{e}");
        let r = req(
            serde_json::json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}),
        );
        let e = chat_messages(&r).expect_err("no name").0.to_string();
        assert!(e.contains("messages[0].tool_calls[0].function.name"), "{e}");
    }
}
