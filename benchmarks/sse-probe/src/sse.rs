//! Splits a byte stream into server-sent events and says which carry generated text.

/// Accumulates body bytes and yields complete `data:` payloads.
#[derive(Default)]
pub struct EventSplitter {
    buf: Vec<u8>,
}

impl EventSplitter {
    /// Appends `chunk` and returns the `data:` payloads of the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = find_event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end.0 + end.1).collect();
            let text = String::from_utf8_lossy(&event[..end.0]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// Position and length of the first blank-line separator.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Generated tokens in one event: a TGI `token` event counts one; an OpenAI chunk counts one
/// when it carries text (role-only and usage-only chunks carry none). `[DONE]` counts none.
pub fn tokens_in(data: &str) -> usize {
    if data == "[DONE]" {
        return 0;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return 0;
    };
    if v.get("token").is_some() {
        return 1;
    }
    let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
        return 0;
    };
    let text = choice
        .get("delta")
        .and_then(|d| d.get("content"))
        .or_else(|| choice.get("text"))
        .and_then(|t| t.as_str());
    usize::from(text.is_some_and(|t| !t.is_empty()))
}

/// An error event (TGI `error` field or OpenAI `error` object).
pub fn is_error(data: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(data)
        .map(|v| v.get("error").is_some_and(|e| !e.is_null()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks() {
        let mut s = EventSplitter::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            s.push(b":1}\n\ndata: [DONE]\n\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
        assert!(s.push(b"").is_empty());
    }

    #[test]
    fn crlf_separators_and_comments() {
        let mut s = EventSplitter::default();
        let got = s.push(b": keep-alive\r\n\r\ndata: x\r\n\r\n");
        assert_eq!(got, vec!["x"]);
    }

    #[test]
    fn token_counting() {
        assert_eq!(tokens_in(r#"{"token":{"id":5,"text":""}}"#), 1);
        assert_eq!(tokens_in(r#"{"choices":[{"delta":{"content":"hi"}}]}"#), 1);
        assert_eq!(
            tokens_in(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#),
            0
        );
        assert_eq!(tokens_in(r#"{"choices":[{"delta":{"content":""}}]}"#), 0);
        assert_eq!(
            tokens_in(r#"{"choices":[],"usage":{"completion_tokens":3}}"#),
            0
        );
        assert_eq!(tokens_in(r#"{"choices":[{"text":"a"}]}"#), 1);
        assert_eq!(tokens_in("[DONE]"), 0);
        assert_eq!(tokens_in("not json"), 0);
    }

    #[test]
    fn error_events() {
        assert!(is_error(r#"{"error":"boom"}"#));
        assert!(is_error(r#"{"error":{"message":"boom"}}"#));
        assert!(!is_error(r#"{"token":{"id":1}}"#));
    }
}
