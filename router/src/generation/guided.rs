//! Guided decoding: a request's grammar (JSON schema, regex, choice, Lark) is compiled once
//! by llguidance against the served tokenizer, so that an invalid or unsupported one is
//! refused with 422 before anything is queued. What travels to the executor is the checked
//! source (kind + text): the engine builds its own matcher from it and masks every step.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::ParserFactory;

use crate::pb;

/// A grammar as the request gave it, before it is compiled.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    JsonSchema(serde_json::Value),
    Regex(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
    /// llguidance's Lark syntax (a context-free grammar).
    Lark(String),
}

impl GrammarSpec {
    /// Any JSON object (OpenAI's `json_object`).
    pub fn any_json_object() -> Self {
        GrammarSpec::JsonSchema(serde_json::json!({"type": "object"}))
    }

    fn to_proto(&self) -> pb::Grammar {
        let (kind, value) = match self {
            GrammarSpec::JsonSchema(v) => (pb::GrammarKind::JsonSchema, v.to_string()),
            GrammarSpec::Regex(r) => (pb::GrammarKind::Regex, r.clone()),
            GrammarSpec::Choice(c) => (pb::GrammarKind::Regex, choice_regex(c)),
            GrammarSpec::Lark(l) => (pb::GrammarKind::Lark, l.clone()),
        };
        pb::Grammar {
            kind: kind as i32,
            value,
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            GrammarSpec::JsonSchema(v) => TopLevelGrammar::from_json_schema(v.clone()),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            GrammarSpec::Choice(c) => TopLevelGrammar::from_regex(&choice_regex(c)),
            GrammarSpec::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        }
    }
}

/// `a|b|c` with every character matched literally.
fn choice_regex(choices: &[String]) -> String {
    choices
        .iter()
        .map(|c| {
            let mut out = String::with_capacity(c.len() + 4);
            for ch in c.chars() {
                if "\\.+*?()|[]{}^$#&-~/\"".contains(ch) {
                    out.push('\\');
                }
                out.push(ch);
            }
            out
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// The grammar compiler of one served tokenizer. Cheap to clone.
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarCompiler")
    }
}

impl GrammarCompiler {
    /// From the model's tokenizer.json (token bytes as llguidance reads them) and its
    /// end-of-sequence id.
    pub fn from_tokenizer_json(json: &serde_json::Value, eos: u32) -> Result<Self, String> {
        let words = llguidance::token_bytes_from_tokenizer_json(json)
            .map_err(|e| format!("llguidance cannot read the tokenizer: {e}"))?;
        let info = TokRxInfo {
            vocab_size: words.len() as u32,
            tok_eos: eos,
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let env = ApproximateTokEnv::new(TokTrie::from(&info, &words));
        let factory = ParserFactory::new_simple(&(Arc::new(env) as _))
            .map_err(|e| format!("llguidance cannot build its parser factory: {e}"))?;
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// Compiles `spec` (a JSON schema compiles in milliseconds: call off the async threads)
    /// and returns what the executor enforces, or why the grammar cannot be served.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<pb::Grammar, String> {
        if let GrammarSpec::Choice(c) = spec {
            if c.is_empty() || c.iter().any(String::is_empty) {
                return Err("a choice needs at least one non-empty string".into());
            }
        }
        // llguidance may panic on pathological input; a request must never take the router down.
        let factory = self.factory.clone();
        let grammar = spec.top_level();
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            factory.create_parser(grammar).map(|_| ())
        }));
        match parsed {
            Ok(Ok(())) => Ok(spec.to_proto()),
            Ok(Err(e)) => Err(first_line(&e.to_string())),
            Err(_) => Err("the grammar compiler failed on this grammar".into()),
        }
    }
}

/// llguidance's errors can carry the whole grammar; the first line says what is wrong.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s).trim();
    let mut out: String = line.chars().take(300).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::generation::detokenizer::tests::byte_level_tokenizer;

    pub(crate) fn compiler() -> GrammarCompiler {
        let json: serde_json::Value =
            serde_json::from_str(&byte_level_tokenizer().to_string(false).expect("json"))
                .expect("tokenizer json");
        GrammarCompiler::from_tokenizer_json(&json, 0).expect("compiler")
    }

    #[test]
    fn valid_grammars_compile_to_their_source() {
        let c = compiler();
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
        let g = c
            .compile(&GrammarSpec::JsonSchema(schema.clone()))
            .expect("schema");
        assert_eq!(g.kind, pb::GrammarKind::JsonSchema as i32);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&g.value).expect("json"),
            schema
        );
        let g = c
            .compile(&GrammarSpec::Regex("[0-9]{3}".into()))
            .expect("regex");
        assert_eq!(g.value, "[0-9]{3}");
        c.compile(&GrammarSpec::Lark("start: \"yes\" | \"no\"".into()))
            .expect("lark");
        c.compile(&GrammarSpec::any_json_object()).expect("object");
    }

    #[test]
    fn invalid_grammars_say_why() {
        let c = compiler();
        let e = c
            .compile(&GrammarSpec::Regex("(unclosed".into()))
            .expect_err("bad regex");
        assert!(!e.is_empty());
        let e = c
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "no-such-type"}),
            ))
            .expect_err("bad schema");
        assert!(!e.is_empty() && !e.contains('\n'), "{e}");
        assert!(c
            .compile(&GrammarSpec::Lark("start: undefined_rule".into()))
            .is_err());
        assert!(c.compile(&GrammarSpec::Choice(vec![])).is_err());
    }

    #[test]
    fn choices_are_literal() {
        assert_eq!(choice_regex(&["a.b".into(), "c|d".into()]), "a\\.b|c\\|d");
        let c = compiler();
        let g = c
            .compile(&GrammarSpec::Choice(vec!["yes".into(), "(no)".into()]))
            .expect("choice");
        assert_eq!(g.kind, pb::GrammarKind::Regex as i32);
    }
}
