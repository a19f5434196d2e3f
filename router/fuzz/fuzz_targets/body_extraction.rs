//! Arbitrary request bodies and content types through the HTTP body extractors of both route
//! families (`TgiJson`, `OpenAiJson`), as axum runs them before any handler. Nothing may
//! panic; every rejection is 413, 415 or 422 with a non-empty message in the family's own
//! error shape.

#![no_main]

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tensorgate_router::http::extract::{OpenAiJson, TgiJson};
use tensorgate_router::http::openai::schemas::{ChatCompletionRequest, CompletionRequest};
use tensorgate_router::http::tgi::schemas::{GenerateRequest, TokenizeRequest};

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/vnd.api+json",
    "text/plain",
    "",
];

fn request(content_type: &str, body: &[u8]) -> Request<Body> {
    let mut b = Request::builder().method("POST").uri("/x");
    if !content_type.is_empty() {
        b = b.header("content-type", content_type);
    }
    b.body(Body::from(body.to_vec())).expect("a valid request")
}

async fn check_rejection(response: axum::response::Response, openai: bool) {
    let status = response.status();
    assert!(
        matches!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::UNSUPPORTED_MEDIA_TYPE
                | StatusCode::UNPROCESSABLE_ENTITY
        ),
        "unexpected status {status}"
    );
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json: Value = serde_json::from_slice(&bytes).expect("a JSON error body");
    let message = if openai {
        assert_eq!(json["error"]["type"], "invalid_request_error");
        &json["error"]["message"]
    } else {
        assert!(json["error_type"].is_string());
        &json["error"]
    };
    assert!(
        message.as_str().is_some_and(|m| !m.is_empty()),
        "empty message: {json}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[selector as usize % CONTENT_TYPES.len()];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        match (selector / 8) % 4 {
            0 => {
                if let Err(r) =
                    TgiJson::<GenerateRequest>::from_request(request(content_type, body), &()).await
                {
                    check_rejection(r.into_response(), false).await;
                }
            }
            1 => {
                if let Err(r) =
                    TgiJson::<TokenizeRequest>::from_request(request(content_type, body), &()).await
                {
                    check_rejection(r.into_response(), false).await;
                }
            }
            2 => {
                if let Err(r) = OpenAiJson::<ChatCompletionRequest>::from_request(
                    request(content_type, body),
                    &(),
                )
                .await
                {
                    check_rejection(r.into_response(), true).await;
                }
            }
            _ => {
                if let Err(r) =
                    OpenAiJson::<CompletionRequest>::from_request(request(content_type, body), &())
                        .await
                {
                    check_rejection(r.into_response(), true).await;
                }
            }
        }
    });
});
