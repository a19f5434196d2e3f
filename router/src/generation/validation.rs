//! Checks a request against the limits the executor reported, before anything is queued.
//! Every message names the parameter and the limit that was broken.

use crate::generation::guided::GrammarSpec;
use crate::generation::parameters::GenerateParameters;
use crate::pb;

/// What one request may ask for: the executor's limits, lowered by router flags.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_top_n_tokens: u32,
    pub max_stop_sequences: usize,
    pub max_stop_sequence_bytes: usize,
    /// Most sequences one TGI `best_of` request may sample (router `--max-best-of`).
    pub max_best_of: u32,
    /// Token ids are below it (logit_bias, stop_token_ids).
    pub vocab_size: u32,
    pub features: pb::Features,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`{0}` must be strictly positive, got {1}")]
    NotPositive(&'static str, String),
    #[error("`{name}` must be a finite number, got {value}")]
    NotFinite { name: &'static str, value: f32 },
    #[error("`{name}` must be {bounds}, got {value}")]
    OutOfRange {
        name: &'static str,
        bounds: &'static str,
        value: String,
    },
    #[error("`inputs` must have less than {max} tokens. Given: {given}")]
    InputLength { max: u32, given: usize },
    #[error("`inputs` tokens + `max_new_tokens` must be <= {max}. Given: {input} `inputs` tokens and {new} `max_new_tokens`")]
    TotalLength { max: u32, input: usize, new: u64 },
    #[error(
        "`truncate` must be strictly positive and less than or equal to {max}. Given: {given}"
    )]
    Truncate { max: u32, given: i64 },
    #[error("`stop` supports up to {max} stop sequences. Given: {given}")]
    StopSequences { max: usize, given: usize },
    #[error("each `stop` sequence must be 1 to {max} bytes long. Given: {given}")]
    StopSequenceLength { max: usize, given: usize },
    #[error("`top_n_tokens` must be <= {max}. Given: {given}")]
    TopNTokens { max: u32, given: u32 },
    #[error("`{0}` is not supported by this server's engine ({1})")]
    Unsupported(&'static str, String),
    #[error("`{field}` is not a grammar this server can enforce: {reason}")]
    Grammar { field: &'static str, reason: String },
    /// A malformed field; `reason` names the part (`tools[0].function.name`, ...).
    #[error("`{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("`{field}` names token id {id}, but the vocabulary has {vocab_size} tokens (ids 0 to {max})", max = vocab_size.saturating_sub(1))]
    TokenId {
        field: &'static str,
        id: String,
        vocab_size: u32,
    },
    /// The request can never be admitted (see scheduler::AdmissionError).
    #[error("{0}")]
    Admission(String),
    // TGI's own messages (router/src/validation.rs) for best_of and prefill details.
    #[error("`best_of` must be > 0 and <= {max}. Given: {given}")]
    BestOf { max: u32, given: u32 },
    #[error("`best_of` != 1 is not allowed for this endpoint (--max-best-of is 1)")]
    BestOfDisabled,
    #[error("you must use sampling when `best_of` is > 1")]
    BestOfSampling,
    #[error("`seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("`best_of` != 1 is not supported when streaming tokens")]
    BestOfStream,
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
}

/// Sampling settings after defaults were applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSampling {
    pub do_sample: bool,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub typical_p: f32,
    pub seed: Option<u64>,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl ValidSampling {
    pub fn to_proto(&self) -> pb::SamplingParams {
        pb::SamplingParams {
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            typical_p: self.typical_p,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
        }
    }
}

/// Parameters that passed validation; the prompt is checked separately once tokenized.
#[derive(Debug, Clone)]
pub struct ValidParameters {
    pub sampling: ValidSampling,
    /// None: fill the context (max_total_tokens - prompt tokens).
    pub max_new_tokens: Option<u32>,
    pub stop_sequences: Vec<String>,
    pub truncate: Option<usize>,
    pub details: bool,
    pub return_full_text: bool,
    pub top_n_tokens: u32,
    pub priority: i32,
    /// Ask the engine for the prompt's log probabilities (TGI `decoder_input_details`, OpenAI
    /// `echo` with `logprobs`).
    pub prompt_logprobs: bool,
    /// Sequences to sample, the best returned (TGI `best_of`); 1 otherwise.
    pub best_of: u32,
    /// Compiled by the router before the request is queued (see `guided`), with the request
    /// field it came from (errors name it).
    pub grammar: Option<(GrammarSpec, &'static str)>,
    pub min_new_tokens: u32,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logit_bias: Vec<(u32, f32)>,
}

fn finite(name: &'static str, value: f32) -> Result<f32, ValidationError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(ValidationError::NotFinite { name, value })
    }
}

fn unsupported(name: &'static str, why: &str) -> ValidationError {
    ValidationError::Unsupported(name, why.to_string())
}

/// Validates everything that does not need the token count.
pub fn validate_parameters(
    p: &GenerateParameters,
    limits: &Limits,
    random_seed: impl FnOnce() -> u64,
) -> Result<ValidParameters, ValidationError> {
    let f = &limits.features;
    let best_of = best_of(p, limits)?;
    if p.watermark {
        return Err(unsupported("watermark", "no watermarking processor"));
    }
    if p.decoder_input_details && !f.prompt_logprobs {
        return Err(unsupported(
            "decoder_input_details",
            "the engine does not return prompt log probabilities",
        ));
    }
    let grammar = match (&p.grammar, &p.guided) {
        (_, Some((spec, field))) => Some((spec.clone(), *field)),
        (None | Some(serde_json::Value::Null), None) => None,
        (Some(g), None) => Some((tgi_grammar(g)?, "grammar")),
    };
    if let Some((_, field)) = &grammar {
        if !f.guided_decoding {
            return Err(unsupported(field, "no grammar backend to enforce it"));
        }
    }
    let sampling_set = sampling_set(p, limits)?;
    if p.adapter_id.is_some() {
        return Err(unsupported("adapter_id", "no LoRA adapters are loaded"));
    }

    let temperature = match p.temperature {
        Some(t) => {
            let t = finite("temperature", t)?;
            if t <= 0.0 {
                return Err(ValidationError::NotPositive("temperature", t.to_string()));
            }
            t
        }
        None => 1.0,
    };
    let top_k = match p.top_k {
        Some(k) if k <= 0 => return Err(ValidationError::NotPositive("top_k", k.to_string())),
        Some(k) => {
            if !f.top_k {
                return Err(unsupported("top_k", "top-k sampling"));
            }
            u32::try_from(k).unwrap_or(u32::MAX)
        }
        None => 0,
    };
    let top_p = match p.top_p {
        Some(v) => {
            let v = finite("top_p", v)?;
            if v <= 0.0 || v > 1.0 {
                return Err(ValidationError::OutOfRange {
                    name: "top_p",
                    bounds: "> 0.0 and <= 1.0",
                    value: v.to_string(),
                });
            }
            if v < 1.0 && !f.top_p {
                return Err(unsupported("top_p", "nucleus sampling"));
            }
            v
        }
        None => 1.0,
    };
    let typical_p = match p.typical_p {
        Some(v) => {
            let v = finite("typical_p", v)?;
            if v <= 0.0 || v > 1.0 {
                return Err(ValidationError::OutOfRange {
                    name: "typical_p",
                    bounds: "> 0.0 and <= 1.0",
                    value: v.to_string(),
                });
            }
            if v < 1.0 && !f.typical_p {
                return Err(unsupported("typical_p", "typical sampling"));
            }
            v
        }
        None => 1.0,
    };
    let repetition_penalty = match p.repetition_penalty {
        Some(v) => {
            let v = finite("repetition_penalty", v)?;
            if v <= 0.0 {
                return Err(ValidationError::NotPositive(
                    "repetition_penalty",
                    v.to_string(),
                ));
            }
            if v != 1.0 && !f.repetition_penalty {
                return Err(unsupported("repetition_penalty", "repetition penalty"));
            }
            v
        }
        None => 1.0,
    };
    let frequency_penalty = penalty(
        "frequency_penalty",
        p.frequency_penalty,
        f.frequency_penalty,
    )?;
    let presence_penalty = penalty("presence_penalty", p.presence_penalty, f.presence_penalty)?;

    // As in TGI: any warper other than the neutral value turns sampling on.
    let do_sample = p.do_sample
        || p.temperature.is_some_and(|t| t != 1.0)
        || top_k > 0
        || top_p < 1.0
        || typical_p < 1.0;
    let seed = if do_sample {
        if !f.seed && p.seed.is_some() {
            return Err(unsupported("seed", "seeded sampling"));
        }
        if best_of > 1 && p.seed.is_some() {
            return Err(ValidationError::BestOfSeed);
        }
        Some(p.seed.unwrap_or_else(random_seed))
    } else {
        None
    };

    let max_new_tokens = match p.max_new_tokens {
        Some(n) if n <= 0 => {
            return Err(ValidationError::NotPositive(
                "max_new_tokens",
                n.to_string(),
            ))
        }
        Some(n) => {
            let max = limits.max_total_tokens;
            if n > i64::from(max) {
                return Err(ValidationError::OutOfRange {
                    name: "max_new_tokens",
                    bounds: "<= max_total_tokens (see /info)",
                    value: format!("{n} (max_total_tokens is {max})"),
                });
            }
            Some(n as u32)
        }
        None => None,
    };

    if p.stop.len() > limits.max_stop_sequences {
        return Err(ValidationError::StopSequences {
            max: limits.max_stop_sequences,
            given: p.stop.len(),
        });
    }
    for s in &p.stop {
        if s.is_empty() || s.len() > limits.max_stop_sequence_bytes {
            return Err(ValidationError::StopSequenceLength {
                max: limits.max_stop_sequence_bytes,
                given: s.len(),
            });
        }
    }

    let truncate = match p.truncate {
        Some(t) if t <= 0 || t > i64::from(limits.max_input_tokens) => {
            return Err(ValidationError::Truncate {
                max: limits.max_input_tokens,
                given: t,
            })
        }
        Some(t) => Some(t as usize),
        None => None,
    };

    let top_n_tokens = p.top_n_tokens.unwrap_or(0);
    if top_n_tokens > limits.max_top_n_tokens {
        return Err(ValidationError::TopNTokens {
            max: limits.max_top_n_tokens,
            given: top_n_tokens,
        });
    }

    Ok(ValidParameters {
        sampling: ValidSampling {
            do_sample,
            temperature,
            top_k,
            top_p,
            typical_p,
            seed,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
        },
        max_new_tokens,
        stop_sequences: p.stop.clone(),
        truncate,
        details: p.details,
        return_full_text: p.return_full_text.unwrap_or(false),
        top_n_tokens,
        priority: p.priority.unwrap_or(0),
        prompt_logprobs: p.decoder_input_details,
        best_of,
        grammar,
        min_new_tokens: sampling_set.min_new_tokens,
        stop_token_ids: sampling_set.stop_token_ids,
        ignore_eos: sampling_set.ignore_eos,
        logit_bias: sampling_set.logit_bias,
    })
}

/// TGI's `best_of`: n samples of one prompt, the best returned. As TGI: sampling only, at most
/// --max-best-of, and a seed is refused (each sequence gets its own). The best is picked by the
/// generated tokens' log probabilities, so the engine must return them.
fn best_of(p: &GenerateParameters, limits: &Limits) -> Result<u32, ValidationError> {
    let n = match p.best_of {
        None | Some(1) => return Ok(1),
        Some(n) => n,
    };
    if limits.max_best_of == 1 {
        return Err(ValidationError::BestOfDisabled);
    }
    if n == 0 || n > limits.max_best_of {
        return Err(ValidationError::BestOf {
            max: limits.max_best_of,
            given: n,
        });
    }
    let sampling = p.do_sample
        || p.temperature.is_some()
        || p.top_k.is_some()
        || p.top_p.is_some()
        || p.typical_p.is_some();
    if !sampling {
        return Err(ValidationError::BestOfSampling);
    }
    if !limits.features.logprobs {
        return Err(unsupported(
            "best_of",
            "picking the best sequence needs token log probabilities, which it does not return",
        ));
    }
    Ok(n)
}

/// TGI's `grammar`: `{"type": "json", "value": <schema, or a string of one>}` or
/// `{"type": "regex", "value": "<regex>"}`.
fn tgi_grammar(g: &serde_json::Value) -> Result<GrammarSpec, ValidationError> {
    let bad = |reason: &str| ValidationError::Grammar {
        field: "grammar",
        reason: reason.to_string(),
    };
    let obj = g.as_object().ok_or_else(|| {
        bad("expected an object {\"type\": \"json\" | \"regex\", \"value\": ...}")
    })?;
    if let Some(k) = obj.keys().find(|k| *k != "type" && *k != "value") {
        return Err(bad(&format!("unknown field `{k}`")));
    }
    let value = obj.get("value").ok_or_else(|| bad("missing `value`"))?;
    match obj.get("type").and_then(|t| t.as_str()) {
        Some("json") => Ok(GrammarSpec::JsonSchema(json_schema_value(
            value, "grammar",
        )?)),
        Some("regex") => value
            .as_str()
            .map(|r| GrammarSpec::Regex(r.to_string()))
            .ok_or_else(|| bad("a regex `value` must be a string")),
        Some(other) => Err(bad(&format!(
            "unknown type `{other}` (expected `json` or `regex`)"
        ))),
        None => Err(bad("missing `type` (`json` or `regex`)")),
    }
}

/// A JSON schema given as an object, or as a string holding one (TGI accepts both).
pub fn json_schema_value(
    v: &serde_json::Value,
    field: &'static str,
) -> Result<serde_json::Value, ValidationError> {
    let bad = |reason: String| ValidationError::Grammar { field, reason };
    let schema = match v {
        serde_json::Value::String(s) => serde_json::from_str(s)
            .map_err(|e| bad(format!("the schema string is not JSON: {e}")))?,
        other => other.clone(),
    };
    if schema.is_object() || schema.is_boolean() {
        Ok(schema)
    } else {
        Err(bad("a JSON schema must be an object".into()))
    }
}

struct SamplingSet {
    min_new_tokens: u32,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    logit_bias: Vec<(u32, f32)>,
}

/// min_new_tokens, stop_token_ids, ignore_eos and logit_bias: in range, and refused where the
/// engine cannot honour them.
fn sampling_set(p: &GenerateParameters, limits: &Limits) -> Result<SamplingSet, ValidationError> {
    let f = &limits.features;
    let min_new_tokens = match p.min_new_tokens {
        None | Some(0) => 0,
        Some(n) if n < 0 => {
            return Err(ValidationError::OutOfRange {
                name: "min_new_tokens",
                bounds: ">= 0",
                value: n.to_string(),
            })
        }
        Some(n) => {
            if !f.min_new_tokens {
                return Err(unsupported("min_new_tokens", "a minimum length"));
            }
            if let Some(max) = p.max_new_tokens.filter(|m| n > *m) {
                return Err(ValidationError::OutOfRange {
                    name: "min_new_tokens",
                    bounds: "<= max_new_tokens",
                    value: format!("{n} (max_new_tokens is {max})"),
                });
            }
            u32::try_from(n).unwrap_or(u32::MAX)
        }
    };
    let check_id = |field: &'static str, id: u32| {
        if id >= limits.vocab_size {
            Err(ValidationError::TokenId {
                field,
                id: id.to_string(),
                vocab_size: limits.vocab_size,
            })
        } else {
            Ok(id)
        }
    };
    if !p.stop_token_ids.is_empty() && !f.stop_token_ids {
        return Err(unsupported("stop_token_ids", "stop token ids"));
    }
    let stop_token_ids = p
        .stop_token_ids
        .iter()
        .map(|&id| check_id("stop_token_ids", id))
        .collect::<Result<Vec<_>, _>>()?;
    if p.ignore_eos && !f.ignore_eos {
        return Err(unsupported("ignore_eos", "generating past end-of-sequence"));
    }
    let mut logit_bias = Vec::new();
    for (key, &bias) in p.logit_bias.iter().flatten() {
        let id: u32 = key.trim().parse().map_err(|_| ValidationError::TokenId {
            field: "logit_bias",
            id: format!("{key:?}"),
            vocab_size: limits.vocab_size,
        })?;
        let id = check_id("logit_bias", id)?;
        let bias = finite("logit_bias", bias)?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ValidationError::OutOfRange {
                name: "logit_bias",
                bounds: ">= -100 and <= 100",
                value: format!("{bias} (token {id})"),
            });
        }
        logit_bias.push((id, bias));
    }
    if !logit_bias.is_empty() && !f.logit_bias {
        return Err(unsupported("logit_bias", "logit bias"));
    }
    Ok(SamplingSet {
        min_new_tokens,
        stop_token_ids,
        ignore_eos: p.ignore_eos,
        logit_bias,
    })
}

fn penalty(
    name: &'static str,
    value: Option<f32>,
    supported: bool,
) -> Result<f32, ValidationError> {
    match value {
        Some(v) => {
            let v = finite(name, v)?;
            if !(-2.0..=2.0).contains(&v) {
                return Err(ValidationError::OutOfRange {
                    name,
                    bounds: ">= -2.0 and <= 2.0",
                    value: v.to_string(),
                });
            }
            if v != 0.0 && !supported {
                return Err(unsupported(name, "this penalty"));
            }
            Ok(v)
        }
        None => Ok(0.0),
    }
}

/// Applies `truncate`, checks the prompt against the limits and settles max_new_tokens.
pub fn validate_length(
    mut input_ids: Vec<u32>,
    params: &ValidParameters,
    limits: &Limits,
) -> Result<(Vec<u32>, u32), ValidationError> {
    if let Some(t) = params.truncate {
        if input_ids.len() > t {
            input_ids.drain(..input_ids.len() - t);
        }
    }
    if input_ids.is_empty() {
        return Err(ValidationError::EmptyInput);
    }
    let input_len = input_ids.len();
    if input_len > limits.max_input_tokens as usize {
        return Err(ValidationError::InputLength {
            max: limits.max_input_tokens,
            given: input_len,
        });
    }
    let room = (limits.max_total_tokens as usize).saturating_sub(input_len);
    let max_new_tokens = match params.max_new_tokens {
        Some(n) => {
            if input_len + n as usize > limits.max_total_tokens as usize {
                return Err(ValidationError::TotalLength {
                    max: limits.max_total_tokens,
                    input: input_len,
                    new: u64::from(n),
                });
            }
            n
        }
        None if room == 0 => {
            return Err(ValidationError::TotalLength {
                max: limits.max_total_tokens,
                input: input_len,
                new: 1,
            })
        }
        None => room as u32,
    };
    Ok((input_ids, max_new_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_input_tokens: 10,
            max_total_tokens: 16,
            max_top_n_tokens: 5,
            max_stop_sequences: 2,
            max_stop_sequence_bytes: 8,
            max_best_of: 2,
            vocab_size: 100,
            features: pb::Features {
                logprobs: true,
                seed: true,
                top_k: true,
                top_p: true,
                ..Default::default()
            },
        }
    }

    fn all_features() -> Limits {
        let mut l = limits();
        l.features.guided_decoding = true;
        l.features.min_new_tokens = true;
        l.features.logit_bias = true;
        l.features.stop_token_ids = true;
        l.features.ignore_eos = true;
        l
    }

    #[test]
    fn tgi_grammar_shapes() {
        let l = all_features();
        let v = validate_parameters(
            &params(r#"{"grammar": {"type": "json", "value": {"type": "object"}}}"#),
            &l,
            || 1,
        )
        .expect("json grammar");
        assert_eq!(
            v.grammar,
            Some((
                GrammarSpec::JsonSchema(serde_json::json!({"type": "object"})),
                "grammar"
            ))
        );
        let v = validate_parameters(
            &params(r#"{"grammar": {"type": "json", "value": "{\"type\": \"integer\"}"}}"#),
            &l,
            || 1,
        )
        .expect("schema as a string");
        assert!(matches!(v.grammar, Some((GrammarSpec::JsonSchema(_), _))));
        let v = validate_parameters(
            &params(r#"{"grammar": {"type": "regex", "value": "[a-z]+"}}"#),
            &l,
            || 1,
        )
        .expect("regex");
        assert_eq!(
            v.grammar,
            Some((GrammarSpec::Regex("[a-z]+".into()), "grammar"))
        );
        for (bad, needle) in [
            (
                r#"{"grammar": {"type": "xml", "value": "x"}}"#,
                "unknown type `xml`",
            ),
            (
                r#"{"grammar": {"type": "regex", "value": 3}}"#,
                "must be a string",
            ),
            (r#"{"grammar": {"type": "json"}}"#, "missing `value`"),
            (r#"{"grammar": {"type": "json", "value": "{"}}"#, "not JSON"),
            (
                r#"{"grammar": {"type": "json", "value": [1]}}"#,
                "must be an object",
            ),
            (r#"{"grammar": [1]}"#, "expected an object"),
        ] {
            let e = validate_parameters(&params(bad), &l, || 1).expect_err(bad);
            let m = e.to_string();
            assert!(
                m.starts_with("`grammar`") && m.contains(needle),
                "{bad}: {m}"
            );
        }
        let e = validate_parameters(
            &params(r#"{"grammar": {"type": "regex", "value": "a"}}"#),
            &limits(),
            || 1,
        )
        .expect_err("no backend");
        assert_eq!(
            e,
            ValidationError::Unsupported("grammar", "no grammar backend to enforce it".into())
        );
    }

    #[test]
    fn sampling_set_is_checked_against_the_vocabulary_and_the_engine() {
        let l = all_features();
        let v = validate_parameters(
            &params(r#"{"min_new_tokens": 3, "max_new_tokens": 5, "stop_token_ids": [7], "ignore_eos": true, "logit_bias": {"42": -100, "3": 2.5}}"#),
            &l,
            || 1,
        )
        .expect("valid");
        assert_eq!(v.min_new_tokens, 3);
        assert_eq!(v.stop_token_ids, vec![7]);
        assert!(v.ignore_eos);
        assert_eq!(v.logit_bias, vec![(3, 2.5), (42, -100.0)]);
        for (bad, needle) in [
            (
                r#"{"logit_bias": {"100": 1}}"#,
                "`logit_bias` names token id 100, but the vocabulary has 100 tokens",
            ),
            (
                r#"{"logit_bias": {"x": 1}}"#,
                "`logit_bias` names token id \"x\"",
            ),
            (
                r#"{"logit_bias": {"1": 101}}"#,
                "`logit_bias` must be >= -100 and <= 100",
            ),
            (
                r#"{"stop_token_ids": [100]}"#,
                "`stop_token_ids` names token id 100",
            ),
            (
                r#"{"min_new_tokens": 6, "max_new_tokens": 5}"#,
                "`min_new_tokens` must be <= max_new_tokens",
            ),
            (r#"{"min_new_tokens": -1}"#, "`min_new_tokens` must be >= 0"),
        ] {
            let e = validate_parameters(&params(bad), &l, || 1).expect_err(bad);
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
        for (field, body) in [
            ("min_new_tokens", r#"{"min_new_tokens": 2}"#),
            ("logit_bias", r#"{"logit_bias": {"1": 1}}"#),
            ("stop_token_ids", r#"{"stop_token_ids": [1]}"#),
            ("ignore_eos", r#"{"ignore_eos": true}"#),
        ] {
            let e = validate_parameters(&params(body), &limits(), || 1).expect_err(body);
            assert!(
                matches!(e, ValidationError::Unsupported(name, _) if name == field),
                "{e}"
            );
        }
    }

    fn params(json: &str) -> GenerateParameters {
        serde_json::from_str(json).expect("test json")
    }

    fn check(json: &str) -> Result<ValidParameters, ValidationError> {
        validate_parameters(&params(json), &limits(), || 7)
    }

    #[test]
    fn defaults_are_greedy_and_fill_the_context() {
        let p = check("{}").expect("valid");
        assert!(!p.sampling.do_sample);
        assert_eq!(p.sampling.seed, None);
        let (ids, n) = validate_length(vec![1, 2, 3], &p, &limits()).expect("valid");
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(n, 13);
    }

    #[test]
    fn warpers_turn_sampling_on_with_a_seed() {
        let p = check(r#"{"temperature":0.5}"#).expect("valid");
        assert!(p.sampling.do_sample);
        assert_eq!(p.sampling.seed, Some(7));
        let p = check(r#"{"do_sample":true,"seed":42,"top_k":5,"top_p":0.9}"#).expect("valid");
        assert_eq!(p.sampling.seed, Some(42));
        assert_eq!(p.sampling.top_k, 5);
    }

    #[test]
    fn bad_numbers_name_the_parameter() {
        let e = check(r#"{"temperature":0}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`temperature` must be strictly positive, got 0"
        );
        let e = check(r#"{"top_p":1.5}"#).unwrap_err();
        assert_eq!(e.to_string(), "`top_p` must be > 0.0 and <= 1.0, got 1.5");
        let e = check(r#"{"top_k":-1}"#).unwrap_err();
        assert!(e.to_string().contains("`top_k`"));
        let e = check(r#"{"max_new_tokens":0}"#).unwrap_err();
        assert!(e
            .to_string()
            .contains("`max_new_tokens` must be strictly positive"));
        let e = check(r#"{"max_new_tokens":100000000000}"#).unwrap_err();
        assert!(e.to_string().contains("max_total_tokens is 16"), "{e}");
        let e = check(r#"{"frequency_penalty":3}"#).unwrap_err();
        assert!(e.to_string().contains(">= -2.0 and <= 2.0"));
    }

    #[test]
    fn nan_is_rejected() {
        let p = GenerateParameters {
            temperature: Some(f32::NAN),
            ..Default::default()
        };
        let e = validate_parameters(&p, &limits(), || 0).unwrap_err();
        assert!(matches!(
            e,
            ValidationError::NotFinite {
                name: "temperature",
                ..
            }
        ));
    }

    #[test]
    fn unsupported_features_are_refused_not_ignored() {
        for (json, name) in [
            (r#"{"watermark":true}"#, "watermark"),
            (r#"{"decoder_input_details":true}"#, "decoder_input_details"),
            (r#"{"typical_p":0.5}"#, "typical_p"),
            (r#"{"repetition_penalty":1.2}"#, "repetition_penalty"),
            (r#"{"grammar":{"type":"json","value":{}}}"#, "grammar"),
        ] {
            match check(json) {
                Err(ValidationError::Unsupported(n, _)) => assert_eq!(n, name),
                other => panic!("{json}: {other:?}"),
            }
        }
        // Neutral values are not a request for the feature.
        assert!(check(r#"{"repetition_penalty":1.0,"typical_p":1.0}"#).is_ok());
    }

    #[test]
    fn best_of_follows_tgi() {
        let p = check(r#"{"best_of":2,"do_sample":true}"#).expect("valid");
        assert_eq!(p.best_of, 2);
        assert!(p.sampling.seed.is_some(), "each sequence gets a seed");
        assert_eq!(check(r#"{"best_of":1}"#).expect("valid").best_of, 1);
        for (json, want) in [
            (
                r#"{"best_of":3,"do_sample":true}"#,
                "`best_of` must be > 0 and <= 2. Given: 3",
            ),
            (
                r#"{"best_of":0,"do_sample":true}"#,
                "`best_of` must be > 0 and <= 2. Given: 0",
            ),
            (
                r#"{"best_of":2}"#,
                "you must use sampling when `best_of` is > 1",
            ),
            (
                r#"{"best_of":2,"temperature":0.5,"seed":3}"#,
                "`seed` must not be set when `best_of` > 1",
            ),
        ] {
            assert_eq!(check(json).expect_err(json).to_string(), want);
        }
        let mut one = limits();
        one.max_best_of = 1;
        let e = validate_parameters(&params(r#"{"best_of":2,"do_sample":true}"#), &one, || 1)
            .expect_err("disabled");
        assert_eq!(e, ValidationError::BestOfDisabled);
        let mut no_logprobs = limits();
        no_logprobs.features.logprobs = false;
        let e = validate_parameters(
            &params(r#"{"best_of":2,"do_sample":true}"#),
            &no_logprobs,
            || 1,
        )
        .expect_err("no logprobs");
        assert!(
            matches!(e, ValidationError::Unsupported("best_of", _)),
            "{e}"
        );
    }

    #[test]
    fn decoder_input_details_needs_the_engine() {
        let e = check(r#"{"decoder_input_details":true}"#).expect_err("not claimed");
        assert!(
            matches!(e, ValidationError::Unsupported("decoder_input_details", _)),
            "{e}"
        );
        let mut l = limits();
        l.features.prompt_logprobs = true;
        let p = validate_parameters(&params(r#"{"decoder_input_details":true}"#), &l, || 1)
            .expect("claimed");
        assert!(p.prompt_logprobs);
        assert!(!check("{}").expect("valid").prompt_logprobs);
    }

    #[test]
    fn stop_sequences_are_bounded() {
        let e = check(r#"{"stop":["a","b","c"]}"#).unwrap_err();
        assert_eq!(e, ValidationError::StopSequences { max: 2, given: 3 });
        let e = check(r#"{"stop":["123456789"]}"#).unwrap_err();
        assert_eq!(e, ValidationError::StopSequenceLength { max: 8, given: 9 });
        let e = check(r#"{"stop":[""]}"#).unwrap_err();
        assert!(matches!(e, ValidationError::StopSequenceLength { .. }));
    }

    #[test]
    fn lengths_are_checked_against_the_limits() {
        let p = check(r#"{"max_new_tokens":10}"#).expect("valid");
        let e = validate_length((0..11).collect(), &p, &limits()).unwrap_err();
        assert_eq!(e, ValidationError::InputLength { max: 10, given: 11 });
        let e = validate_length((0..7).collect(), &p, &limits()).unwrap_err();
        assert_eq!(e.to_string(), "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 7 `inputs` tokens and 10 `max_new_tokens`");
        assert!(validate_length((0..6).collect(), &p, &limits()).is_ok());
        let e = validate_length(vec![], &p, &limits()).unwrap_err();
        assert_eq!(e, ValidationError::EmptyInput);
    }

    #[test]
    fn truncate_keeps_the_last_tokens() {
        let p = check(r#"{"truncate":3,"max_new_tokens":2}"#).expect("valid");
        let (ids, _) = validate_length((0..20).collect(), &p, &limits()).expect("valid");
        assert_eq!(ids, vec![17, 18, 19]);
        let e = check(r#"{"truncate":11}"#).unwrap_err();
        assert_eq!(e, ValidationError::Truncate { max: 10, given: 11 });
    }

    #[test]
    fn top_n_tokens_is_bounded() {
        let e = check(r#"{"top_n_tokens":6}"#).unwrap_err();
        assert_eq!(e, ValidationError::TopNTokens { max: 5, given: 6 });
    }

    #[test]
    fn unknown_parameters_are_rejected() {
        let r: Result<GenerateParameters, _> = serde_json::from_str(r#"{"max_tokens":3}"#);
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("unknown field `max_tokens`"));
    }
}
