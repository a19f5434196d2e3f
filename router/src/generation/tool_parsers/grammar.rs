//! The grammar that forces tool calls (OpenAI `tool_choice: "required"` or a named
//! function) in the served family's format, each call's arguments held to its function's
//! parameter schema by llguidance's `%json`, so that they always validate. Formats whose
//! calls open with a special token (Mistral's `[TOOL_CALLS]`, Llama's `<|python_tag|>`) are
//! forced without it: the parsers read them without it. The JSON is written as Python's
//! `json.dumps` writes it (`", "`, `": "`, no other whitespace), as the families' templates
//! show calls: a small model given llguidance's default, free whitespace, can fill
//! `max_tokens` with newlines inside an object.

use serde_json::{json, Value};

use super::ToolCallFormat;
use crate::generation::guided::GrammarSpec;

/// A function the grammar may call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSchema {
    pub name: String,
    /// The JSON schema of its arguments (OpenAI's `function.parameters`).
    pub parameters: Value,
}

impl FunctionSchema {
    /// OpenAI: a function without `parameters` takes none.
    pub fn new(name: String, parameters: Option<Value>) -> Self {
        Self {
            name,
            parameters: parameters.unwrap_or_else(
                || json!({"type": "object", "properties": {}, "additionalProperties": false}),
            ),
        }
    }
}

/// llguidance's options for a JSON schema, carried in the schema itself.
fn dumps_style(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// A Lark string literal (Lark's strings are JSON strings).
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The grammar of an answer that is one or more calls (one when `!parallel`) of `functions`.
pub fn tool_grammar(
    format: ToolCallFormat,
    functions: &[FunctionSchema],
    parallel: bool,
) -> GrammarSpec {
    // One rule per function: the call object with its name fixed, its arguments by schema.
    let (key, fn_rules) = match format {
        ToolCallFormat::Llama3Json => return llama3_schema(functions),
        ToolCallFormat::Hermes | ToolCallFormat::Mistral => ("arguments", functions),
    };
    let mut rules = String::new();
    let mut alternatives = Vec::with_capacity(fn_rules.len());
    for (i, f) in fn_rules.iter().enumerate() {
        alternatives.push(format!("fn_{i}"));
        rules.push_str(&format!(
            "fn_{i}: {} %json {} \"}}\"\n",
            lit(&format!("{{\"name\": \"{}\", \"{key}\": ", f.name)),
            dumps_style(f.parameters.clone())
        ));
    }
    let call = alternatives.join(" | ");
    let top = match (format, parallel) {
        (ToolCallFormat::Hermes, false) => "start: call\n".to_string(),
        (ToolCallFormat::Hermes, true) => format!("start: call ({} call)*\n", lit("\n")),
        (_, false) => format!("start: {} call {}\n", lit("["), lit("]")),
        (_, true) => format!(
            "start: {} call ({} call)* {}\n",
            lit("["),
            lit(", "),
            lit("]")
        ),
    };
    let call_rule = match format {
        ToolCallFormat::Hermes => format!(
            "call: {} ({call}) {}\n",
            lit("<tool_call>\n"),
            lit("\n</tool_call>")
        ),
        _ => format!("call: {call}\n"),
    };
    GrammarSpec::Lark(format!("{top}{call_rule}{rules}"))
}

/// Llama's format is plain JSON: the schema of one call object (its template takes one call
/// per assistant message, so one is forced even when parallel calls are allowed).
fn llama3_schema(functions: &[FunctionSchema]) -> GrammarSpec {
    let calls: Vec<Value> = functions
        .iter()
        .map(|f| {
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                "required": ["name", "parameters"],
                "additionalProperties": false,
            })
        })
        .collect();
    GrammarSpec::JsonSchema(dumps_style(match <[Value; 1]>::try_from(calls) {
        Ok([one]) => one,
        Err(calls) => json!({"anyOf": calls}),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
    use llguidance::{Matcher, ParserFactory};

    use super::*;
    use crate::generation::detokenizer::tests::byte_level_tokenizer;
    use crate::generation::guided::tests::compiler;
    use crate::generation::tool_parsers::{ToolCallFormat, ToolCallReader};

    fn functions() -> Vec<FunctionSchema> {
        vec![
            FunctionSchema::new(
                "get_weather".into(),
                Some(json!({
                    "type": "object",
                    "description": "braces } and \"quotes\" in text",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["city", "unit"],
                    "additionalProperties": false,
                })),
            ),
            FunctionSchema::new("get_time".into(), None),
        ]
    }

    /// Whether the grammar accepts `text` as a whole answer (one byte per token).
    fn accepts(spec: &GrammarSpec, text: &str) -> bool {
        let tokenizer = byte_level_tokenizer();
        let json: Value =
            serde_json::from_str(&tokenizer.to_string(false).expect("json")).expect("json");
        let words = llguidance::token_bytes_from_tokenizer_json(&json).expect("words");
        // End of sequence: an id past the byte tokens, so that no text byte ends the answer.
        let info = TokRxInfo {
            vocab_size: words.len() as u32,
            tok_eos: words.len() as u32 - 1,
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let env = ApproximateTokEnv::new(TokTrie::from(&info, &words));
        let factory = ParserFactory::new_simple(&(Arc::new(env) as _)).expect("factory");
        let top = match spec {
            GrammarSpec::JsonSchema(v) => TopLevelGrammar::from_json_schema(v.clone()),
            GrammarSpec::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
            other => panic!("tool grammars are Lark or JSON schema, not {other:?}"),
        };
        let mut m = Matcher::new(factory.create_parser(top));
        let ids = tokenizer
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .to_vec();
        m.consume_tokens(&ids).is_ok() && m.is_accepting().unwrap_or(false)
    }

    const GOOD_WEATHER: &str =
        r#"{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}"#;

    #[test]
    fn hermes_grammar_compiles_and_holds_arguments_to_the_schema() {
        let spec = tool_grammar(ToolCallFormat::Hermes, &functions(), true);
        compiler().compile(&spec).expect("compiles");
        let one = format!("<tool_call>\n{GOOD_WEATHER}\n</tool_call>");
        assert!(accepts(&spec, &one), "{spec:?}");
        let two = format!(
            "{one}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>"
        );
        assert!(accepts(&spec, &two));
        // What the parser reads back is the call the grammar allowed.
        let r = ToolCallReader::new(
            ToolCallFormat::Hermes,
            ["get_weather".into(), "get_time".into()],
            true,
        );
        assert_eq!(r.parse(&two).calls.len(), 2);
        for bad in [
            // enum value outside the schema, missing required property, unknown function,
            // extra property, free whitespace, text instead of a call
            r#"<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}
</tool_call>"#,
            r#"<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>"#,
            r#"<tool_call>
{"name": "launch", "arguments": {}}
</tool_call>"#,
            r#"<tool_call>
{"name": "get_time", "arguments": {"x": 1}}
</tool_call>"#,
            // whitespace json.dumps does not write
            r#"<tool_call>
{"name": "get_weather", "arguments": {
"city": "Paris", "unit": "celsius"}}
</tool_call>"#,
            "It is sunny.",
        ] {
            assert!(!accepts(&spec, bad), "accepted {bad}");
        }
        let single = tool_grammar(ToolCallFormat::Hermes, &functions(), false);
        assert!(accepts(&single, &one));
        assert!(
            !accepts(&single, &two),
            "parallel_tool_calls false allows one call"
        );
    }

    #[test]
    fn mistral_grammar_is_a_list_of_calls() {
        let spec = tool_grammar(ToolCallFormat::Mistral, &functions(), true);
        compiler().compile(&spec).expect("compiles");
        let text = format!("[{GOOD_WEATHER}, {{\"name\": \"get_time\", \"arguments\": {{}}}}]");
        assert!(accepts(&spec, &text));
        assert!(!accepts(&spec, &text.replace("celsius", "kelvin")));
        let single = tool_grammar(ToolCallFormat::Mistral, &functions()[..1], false);
        assert!(accepts(&single, &format!("[{GOOD_WEATHER}]")));
        assert!(!accepts(&single, &text));
    }

    #[test]
    fn llama_grammar_is_the_json_schema_of_one_call() {
        let spec = tool_grammar(ToolCallFormat::Llama3Json, &functions(), true);
        assert!(matches!(spec, GrammarSpec::JsonSchema(_)));
        compiler().compile(&spec).expect("compiles");
        let text = r#"{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}"#;
        assert!(accepts(&spec, text));
        assert!(!accepts(&spec, &text.replace("celsius", "kelvin")));
        assert!(!accepts(&spec, &text.replace("get_weather", "launch")));
        let named = tool_grammar(ToolCallFormat::Llama3Json, &functions()[1..], false);
        assert!(accepts(&named, r#"{"name": "get_time", "parameters": {}}"#));
        assert!(!accepts(&named, text));
    }
}
