//! Log probabilities in OpenAI's two shapes: chat (`{"content": [...]}`) and the legacy
//! completions shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

use serde_json::{json, Map, Value};

use crate::generation::stream::{PromptToken, Token};

/// One token's log probability and its alternatives: a generated token, or an echoed prompt
/// token (legacy completions with `echo`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub text: String,
    /// None only for the prompt's first token (nothing before it predicts it): JSON null.
    pub logprob: Option<f32>,
    /// None only for the prompt's first token.
    pub top: Option<Vec<(String, f32)>>,
    /// Character offset of the token in the choice's text (legacy completions).
    pub offset: usize,
}

/// What stands for a log probability JSON cannot carry (as OpenAI and vLLM write it).
const FLOOR: f32 = -9999.0;

fn alternatives(top: &[Token]) -> Vec<(String, f32)> {
    top.iter()
        .map(|t| (t.text.clone(), t.logprob.unwrap_or(FLOOR)))
        .collect()
}

impl TokenLogprob {
    pub fn from_token(token: &Token, top: &[Token], offset: usize) -> Self {
        Self {
            text: token.text.clone(),
            // The engine always reports it when it claims the feature; NaN never reaches JSON.
            logprob: Some(token.logprob.filter(|l| l.is_finite()).unwrap_or(FLOOR)),
            top: Some(alternatives(top)),
            offset,
        }
    }

    /// An echoed prompt token: the first has neither a log probability nor alternatives.
    pub fn from_prompt(token: &PromptToken, first: bool, offset: usize) -> Self {
        Self {
            text: token.text.clone(),
            logprob: (!first).then(|| token.logprob.unwrap_or(FLOOR)),
            top: (!first).then(|| alternatives(&token.top)),
            offset,
        }
    }

    /// The echoed prompt's entries, offsets from 0 (the echo starts the choice's text).
    pub fn prompt(tokens: &[PromptToken]) -> Vec<Self> {
        let mut offset = 0;
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let entry = Self::from_prompt(t, i == 0, offset);
                offset += t.text.chars().count();
                entry
            })
            .collect()
    }
}

fn bytes(s: &str) -> Value {
    json!(s.as_bytes())
}

/// `choices[].logprobs` of /v1/chat/completions.
pub fn chat(entries: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "token": e.text,
                "logprob": e.logprob.unwrap_or(FLOOR),
                "bytes": bytes(&e.text),
                "top_logprobs": e.top.iter().flatten().map(|(t, l)| json!({
                    "token": t, "logprob": l, "bytes": bytes(t),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

/// `choices[].logprobs` of /v1/completions.
pub fn completion(entries: &[TokenLogprob]) -> Value {
    let top: Vec<Value> = entries
        .iter()
        .map(|e| match &e.top {
            None => Value::Null,
            Some(top) => {
                let mut m = Map::new();
                for (t, l) in top {
                    m.insert(t.clone(), json!(l));
                }
                Value::Object(m)
            }
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| e.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> TokenLogprob {
        TokenLogprob {
            text: "é".into(),
            logprob: Some(-0.5),
            top: Some(vec![("é".into(), -0.5), ("e".into(), -1.5)]),
            offset: 3,
        }
    }

    #[test]
    fn chat_shape() {
        let v = chat(&[entry()]);
        let c = &v["content"][0];
        assert_eq!(c["token"], "é");
        assert_eq!(c["bytes"], json!([0xc3, 0xa9]));
        assert_eq!(c["top_logprobs"][1]["token"], "e");
        assert_eq!(c["top_logprobs"][1]["logprob"], -1.5);
    }

    #[test]
    fn completion_shape() {
        let v = completion(&[entry()]);
        assert_eq!(v["tokens"], json!(["é"]));
        assert_eq!(v["token_logprobs"], json!([-0.5]));
        assert_eq!(v["top_logprobs"][0]["e"], -1.5);
        assert_eq!(v["text_offset"], json!([3]));
    }

    #[test]
    fn an_echoed_prompt_starts_with_nulls() {
        let token = |text: &str, logprob: Option<f32>| PromptToken {
            id: 0,
            text: text.into(),
            logprob,
            top: vec![],
        };
        let prompt = TokenLogprob::prompt(&[
            token("Hé", None),
            token(" you", Some(-2.0)),
            token("!", None),
        ]);
        let v = completion(&[prompt, vec![entry()]].concat());
        assert_eq!(v["tokens"], json!(["Hé", " you", "!", "é"]));
        assert_eq!(v["token_logprobs"], json!([null, -2.0, -9999.0, -0.5]));
        assert_eq!(v["top_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][1], json!({}));
        assert_eq!(v["text_offset"], json!([0, 2, 6, 3]));
    }
}
