//! The OpenAPI document, generated from the handlers and schemas (utoipa), served at
//! /api-doc/openapi.json with Swagger UI at /docs.

use utoipa::OpenApi;

use crate::errors::{ErrorBody, OpenAiErrorBody, OpenAiErrorDetail};
use crate::http::openai::schemas::{
    ChatCompletionRequest, ChatMessageIn, CommonParams, CompletionRequest, ContentPart,
    MessageContent, StreamOptions, StringOrList,
};
use crate::http::tgi::schemas::{
    BestOfSequence, ChatTokenizeResponse, Details, FinishReason, GenerateParameters,
    GenerateRequest, GenerateResponse, Info, PrefillToken, SimpleToken, StreamDetails,
    StreamResponse, Token, TokenizeRequest,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tensorgate",
        description = "TGI- and OpenAI-compatible LLM serving"
    ),
    paths(
        crate::http::tgi::handlers::compat_generate,
        crate::http::tgi::handlers::generate,
        crate::http::tgi::handlers::generate_stream,
        crate::http::tgi::handlers::tokenize,
        crate::http::tgi::handlers::chat_tokenize,
        crate::http::tgi::handlers::info,
        crate::http::tgi::handlers::health,
        crate::http::tgi::handlers::health_generate,
        crate::http::tgi::handlers::metrics,
        crate::http::openai::models::models,
        crate::http::openai::completions::completions,
        crate::http::openai::chat::chat_completions,
    ),
    components(schemas(
        GenerateRequest,
        GenerateParameters,
        GenerateResponse,
        Details,
        BestOfSequence,
        Token,
        PrefillToken,
        FinishReason,
        StreamResponse,
        StreamDetails,
        Info,
        TokenizeRequest,
        SimpleToken,
        ChatTokenizeResponse,
        ErrorBody,
        OpenAiErrorBody,
        OpenAiErrorDetail,
        ChatCompletionRequest,
        CompletionRequest,
        ChatMessageIn,
        MessageContent,
        ContentPart,
        StreamOptions,
        StringOrList,
        CommonParams,
        crate::config::PromptFormat,
    ))
)]
pub struct ApiDoc;

/// The served document: utoipa's, with the server-sent event responses described as OpenAPI
/// 3.2 does (each event an object whose `data` is JSON of a given schema), which utoipa cannot
/// express. A stream's events are tokens, or one final error event.
pub fn document() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        for path in ["/generate_stream", "/"] {
            let content = &mut doc["paths"][path]["post"]["responses"]["200"]["content"];
            if let Some(content) = content.as_object_mut() {
                content.insert(
                    "text/event-stream".into(),
                    serde_json::json!({ "schema": sse_event("StreamResponse", "ErrorBody") }),
                );
            }
        }
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let content = &mut doc["paths"][path]["post"]["responses"]["200"]["content"];
            if let Some(content) = content.as_object_mut() {
                content.insert(
                    "text/event-stream".into(),
                    serde_json::json!({ "schema": {
                        "type": "object",
                        "properties": {
                            "data": {
                                "type": "string",
                                "description": "a JSON chunk, an OpenAI error object, or [DONE]",
                            },
                            "event": { "type": "string" },
                        },
                    }}),
                );
            }
        }
        doc
    })
}

fn sse_event(ok: &str, err: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": { "oneOf": [
                    { "$ref": format!("#/components/schemas/{ok}") },
                    { "$ref": format!("#/components/schemas/{err}") },
                ]},
            },
            "event": { "type": "string" },
        },
    })
}

/// `GET /api-doc/openapi.json`.
pub async fn serve_document() -> axum::Json<&'static serde_json::Value> {
    axum::Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/",
            "/generate",
            "/generate_stream",
            "/tokenize",
            "/chat_tokenize",
            "/info",
            "/health",
            "/health_generate",
            "/v1/models",
            "/v1/completions",
            "/v1/chat/completions",
            "/metrics",
        ] {
            assert!(
                paths.contains_key(p),
                "{p} missing from the OpenAPI document"
            );
        }
        let params = &doc["components"]["schemas"]["GenerateParameters"]["properties"];
        assert!(params["max_new_tokens"].is_object());
        let sse = &paths["/generate_stream"]["post"]["responses"]["200"]["content"]
            ["text/event-stream"]["schema"];
        assert_eq!(
            sse["properties"]["data"]["contentMediaType"],
            "application/json"
        );
        // The shared error list reaches every route with a body, in the route's own shape.
        for (path, shape) in [
            ("/generate", "ErrorBody"),
            ("/v1/chat/completions", "OpenAiErrorBody"),
        ] {
            let responses = &paths[path]["post"]["responses"];
            for status in ["401", "413", "415", "422", "424", "429", "503"] {
                let schema = &responses[status]["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema.as_str(),
                    Some(format!("#/components/schemas/{shape}").as_str()),
                    "{path} {status}"
                );
            }
        }
    }
}
