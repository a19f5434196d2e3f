//! Server-sent events in TGI's format: one `data:` line of JSON per token, the last one
//! carrying `generated_text` and `details`; an error ends the stream as `{"error", "error_type"}`.

use axum::response::sse::Event;

use crate::errors::RouterError;
use crate::generation::stream::{Token, TokenEvent};
use crate::http::tgi::schemas::{StreamDetails, StreamResponse};

/// One event of `/generate_stream`. TGI's format puts the end on a token; when the engine
/// reported its finish after the last token, the closing event names that last token again
/// (`last_id`, same index) with no text and no log probability, and marks it special, so a
/// client that joins token texts gets the answer unchanged.
pub fn stream_response(
    ev: TokenEvent,
    prefix: Option<&str>,
    last_id: Option<u32>,
) -> StreamResponse {
    let (generated_text, details) = match ev.end {
        Some(end) => {
            let text = match prefix {
                Some(p) => format!("{p}{}", end.generated_text),
                None => end.generated_text,
            };
            (
                Some(text),
                Some(StreamDetails {
                    finish_reason: end.finish_reason,
                    generated_tokens: end.generated_tokens,
                    seed: end.seed,
                    input_length: end.input_length,
                    weight_version: end.weight_version,
                }),
            )
        }
        None => (None, None),
    };
    StreamResponse {
        index: ev.index,
        token: ev.token.unwrap_or_else(|| Token {
            id: last_id.unwrap_or_default(),
            text: String::new(),
            logprob: None,
            special: true,
        }),
        top_tokens: ev.top_tokens,
        generated_text,
        details,
    }
}

pub fn token_event(response: &StreamResponse) -> Event {
    json_event(response)
}

pub fn error_event(error: &RouterError) -> Event {
    json_event(&error.body())
}

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    // Serialising our own plain structs cannot fail; an empty event would still be valid SSE.
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::stream::{EndInfo, FinishReason};
    use axum::response::sse::Sse;
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    use std::convert::Infallible;

    async fn render(events: Vec<Event>) -> String {
        let stream = futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
        let response = Sse::new(stream).into_response();
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "SSE content type"
        );
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    fn token(index: u32, text: &str, end: Option<EndInfo>) -> TokenEvent {
        TokenEvent {
            index,
            token: Some(Token {
                id: 7 + index,
                text: text.into(),
                logprob: Some(-0.5),
                special: false,
            }),
            top_tokens: vec![],
            end,
        }
    }

    #[tokio::test]
    async fn events_are_data_lines_separated_by_blank_lines() {
        let end = EndInfo {
            finish_reason: FinishReason::Length,
            generated_text: "Hi\nthere".into(),
            stop_at: None,
            generated_tokens: 2,
            seed: None,
            input_length: 3,
            weight_version: "7".into(),
        };
        let events = vec![
            token_event(&stream_response(token(0, "Hi\n", None), None, None)),
            token_event(&stream_response(token(1, "there", Some(end)), None, None)),
        ];
        let body = render(events).await;
        let frames: Vec<&str> = body.split("\n\n").filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.len(), 2, "{body:?}");
        for f in &frames {
            assert!(
                f.starts_with("data: ") && !f.contains('\n'),
                "one data line: {f:?}"
            );
        }
        let first: serde_json::Value = serde_json::from_str(&frames[0][6..]).expect("json");
        assert_eq!(first["token"]["text"], "Hi\n");
        assert!(first["generated_text"].is_null());
        assert!(first["details"].is_null());
        let last: serde_json::Value = serde_json::from_str(&frames[1][6..]).expect("json");
        assert_eq!(last["generated_text"], "Hi\nthere");
        assert_eq!(last["details"]["finish_reason"], "length");
        assert_eq!(last["details"]["generated_tokens"], 2);
        assert_eq!(last["details"]["input_length"], 3);
        assert_eq!(last["details"]["weight_version"], "7");
        assert_eq!(last["index"], 1);
    }

    #[tokio::test]
    async fn full_text_prefix_is_prepended_to_the_final_text() {
        let end = EndInfo {
            finish_reason: FinishReason::EosToken,
            generated_text: " world".into(),
            stop_at: None,
            generated_tokens: 1,
            seed: Some(3),
            input_length: 1,
            weight_version: "0".into(),
        };
        let r = stream_response(token(0, " world", Some(end)), Some("Hello"), None);
        assert_eq!(r.generated_text.as_deref(), Some("Hello world"));
        assert_eq!(r.details.as_ref().and_then(|d| d.seed), Some(3));
    }

    #[tokio::test]
    async fn errors_use_tgi_shape() {
        let body = render(vec![error_event(&RouterError::Unavailable("gone".into()))]).await;
        let json: serde_json::Value =
            serde_json::from_str(body.trim_end().trim_start_matches("data: ")).expect("json");
        assert_eq!(json["error_type"], "unavailable");
        assert_eq!(json["error"], "Executor unavailable: gone");
    }
}
