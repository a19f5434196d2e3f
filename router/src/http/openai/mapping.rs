//! OpenAI request fields → the generation parameters, so that one validator checks both
//! API families; and the checks only the OpenAI fields need.

use crate::errors::OpenAiError;
use crate::generation::guided::GrammarSpec;
use crate::generation::parameters::GenerateParameters;
use crate::generation::validation::{json_schema_value, ValidationError};
use crate::http::openai::schemas::{ChatMessageIn, CommonParams, MessageContent, StringOrList};

/// Most choices one request may ask for.
pub const MAX_N: u32 = 8;

pub fn unsupported(name: &'static str, why: &str) -> OpenAiError {
    ValidationError::Unsupported(name, why.to_string()).into()
}

/// OpenAI parameters → TGI parameters, so that one validator checks both.
pub fn to_generate_parameters(
    c: &CommonParams,
    max_tokens: Option<i64>,
) -> Result<GenerateParameters, OpenAiError> {
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
        repetition_penalty: c.repetition_penalty.filter(|v| *v != 1.0),
        presence_penalty: c.presence_penalty.filter(|v| *v != 0.0),
        priority: c.priority,
        logit_bias: c.logit_bias.clone(),
        min_new_tokens: c.min_tokens,
        stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: c.ignore_eos.unwrap_or(false),
        guided: guided(c)?,
        ..Default::default()
    })
}

/// The one grammar of an OpenAI request: `response_format` or one of the `guided_*`
/// extensions; asking for two is refused rather than one being ignored.
fn guided(c: &CommonParams) -> Result<Option<(GrammarSpec, &'static str)>, OpenAiError> {
    let mut found: Vec<(GrammarSpec, &'static str)> = Vec::new();
    if let Some(rf) = c.response_format.as_ref().filter(|v| !v.is_null()) {
        if let Some(spec) = response_format(rf)? {
            found.push((spec, "response_format"));
        }
    }
    if let Some(schema) = c.guided_json.as_ref().filter(|v| !v.is_null()) {
        found.push((
            GrammarSpec::JsonSchema(json_schema_value(schema, "guided_json")?),
            "guided_json",
        ));
    }
    if let Some(r) = &c.guided_regex {
        found.push((GrammarSpec::Regex(r.clone()), "guided_regex"));
    }
    if let Some(choices) = &c.guided_choice {
        found.push((GrammarSpec::Choice(choices.clone()), "guided_choice"));
    }
    if let Some(g) = &c.guided_grammar {
        found.push((GrammarSpec::Lark(g.clone()), "guided_grammar"));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(_, f)| *f).collect();
        return Err(ValidationError::Grammar {
            field: found[1].1,
            reason: format!(
                "only one constraint per request; given {}",
                names.join(", ")
            ),
        }
        .into());
    }
    Ok(found.pop())
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema`.
fn response_format(v: &serde_json::Value) -> Result<Option<GrammarSpec>, OpenAiError> {
    let bad = |reason: String| -> OpenAiError {
        ValidationError::Grammar {
            field: "response_format",
            reason,
        }
        .into()
    };
    let kind = v
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| bad("`type` must be `text`, `json_object` or `json_schema`".into()))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::any_json_object())),
        "json_schema" => {
            let js = v
                .get("json_schema")
                .filter(|j| j.is_object())
                .ok_or_else(|| {
                    bad("`json_schema` must be an object {name, schema, strict}".into())
                })?;
            match js.get("schema").filter(|s| !s.is_null()) {
                Some(schema) => Ok(Some(GrammarSpec::JsonSchema(json_schema_value(
                    schema,
                    "response_format",
                )?))),
                None => Ok(Some(GrammarSpec::any_json_object())),
            }
        }
        other => Err(bad(format!(
            "unknown type `{other}` (expected `text`, `json_object` or `json_schema`)"
        ))),
    }
}

pub fn check_n(n: Option<u32>) -> Result<u32, OpenAiError> {
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
                    ("text", None) => {
                        return Err(ValidationError::OutOfRange {
                            name: "text",
                            bounds: "a string in every part of type `text`",
                            value: "missing".into(),
                        }
                        .into())
                    }
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

/// OpenAI's `user`: recorded in the log (at info, with the route), so that an operator can
/// trace abuse to an end user as OpenAI's docs intend; it changes nothing else.
pub fn record_user(route: &'static str, c: &CommonParams) {
    if let Some(user) = &c.user {
        tracing::info!(route, user = %user, "request for an end user");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::openai::schemas::{ChatCompletionRequest, CompletionRequest};

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
        assert_eq!(r.prompt.into_prompts().len(), 2);
        let r: CompletionRequest = serde_json::from_str(r#"{"prompt":[1,2,3]}"#).expect("ids");
        assert_eq!(
            r.prompt.into_prompts(),
            vec![crate::http::openai::schemas::Prompt::Ids(vec![1, 2, 3])]
        );
        let r: CompletionRequest =
            serde_json::from_str(r#"{"prompt":[[1],[2,3]]}"#).expect("id lists");
        assert_eq!(r.prompt.into_prompts().len(), 2);
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt":[1,"a"]}"#).is_err());
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
