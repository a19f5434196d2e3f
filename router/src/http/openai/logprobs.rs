//! Log probabilities in OpenAI's two shapes: chat (`{"content": [...]}`) and the legacy
//! completions shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

use serde_json::{json, Map, Value};

use crate::generation::stream::Token;

/// One generated token's log probability and its alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
    /// Character offset of the token in the choice's text (legacy completions).
    pub offset: usize,
}

impl TokenLogprob {
    pub fn from_token(token: &Token, top: &[Token], offset: usize) -> Self {
        Self {
            text: token.text.clone(),
            // The engine always reports it when it claims the feature; NaN never reaches JSON.
            logprob: token.logprob.filter(|l| l.is_finite()).unwrap_or(-9999.0),
            top: top
                .iter()
                .map(|t| (t.text.clone(), t.logprob.unwrap_or(-9999.0)))
                .collect(),
            offset,
        }
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
                "logprob": e.logprob,
                "bytes": bytes(&e.text),
                "top_logprobs": e.top.iter().map(|(t, l)| json!({
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
        .map(|e| {
            let mut m = Map::new();
            for (t, l) in &e.top {
                m.insert(t.clone(), json!(l));
            }
            Value::Object(m)
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
            logprob: -0.5,
            top: vec![("é".into(), -0.5), ("e".into(), -1.5)],
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
}
