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
    GenerateRequest, GenerateResponse, Info, PrefillToken, RlControlInfo, SimpleToken,
    StreamDetails, StreamResponse, Token, TokenizeRequest,
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
        RlControlInfo,
        crate::executors::pool::WorkerStatus,
        crate::executors::pool::WorkerState,
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

/// The served document: utoipa's (with the rollout-control routes when they are on), with the
/// server-sent event responses described as OpenAPI 3.2 does (each event an object whose
/// `data` is JSON of a given schema), which utoipa cannot express. A stream's events are
/// tokens, or one final error event.
pub fn document(with_rl: bool) -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    static DOC_RL: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    let cell = if with_rl { &DOC_RL } else { &DOC };
    cell.get_or_init(|| {
        let mut api = ApiDoc::openapi();
        if with_rl {
            api.merge(crate::http::rl::openapi::RlApiDoc::openapi());
        }
        let mut doc = serde_json::to_value(api).unwrap_or_default();
        for path in crate::http::request_id::GENERATION_PATHS {
            if let Some(op) = doc["paths"][path]["post"].as_object_mut() {
                request_id_header(op);
            }
        }
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

/// Documents the `x-request-id` header: accepted on the request, echoed on every answer.
fn request_id_header(op: &mut serde_json::Map<String, serde_json::Value>) {
    let param = serde_json::json!({
        "name": "x-request-id",
        "in": "header",
        "required": false,
        "description": "The request's id (1 to 128 characters of A-Z a-z 0-9 - _ . :); made up \
                        when absent. Echoed on the answer; /abort_request names it as `rid`.",
        "schema": { "type": "string", "maxLength": crate::http::request_id::MAX_LEN },
    });
    match op.get_mut("parameters").and_then(|p| p.as_array_mut()) {
        Some(params) => params.push(param),
        None => {
            op.insert("parameters".into(), serde_json::json!([param]));
        }
    }
    if let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) {
        for response in responses.values_mut() {
            let headers = response
                .as_object_mut()
                .map(|r| r.entry("headers").or_insert_with(|| serde_json::json!({})))
                .and_then(|h| h.as_object_mut());
            if let Some(h) = headers {
                h.insert(
                    "x-request-id".into(),
                    serde_json::json!({
                        "description": "The request's id (the client's, or one made up)",
                        "schema": { "type": "string" },
                    }),
                );
            }
        }
    }
}

/// `GET /api-doc/openapi.json`.
pub async fn serve_document(with_rl: bool) -> axum::Json<&'static serde_json::Value> {
    axum::Json(document(with_rl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_routes_are_documented_only_when_on() {
        let off = document(false)["paths"].as_object().expect("paths");
        let on = document(true)["paths"].as_object().expect("paths");
        for p in [
            "/release_memory",
            "/resume_memory",
            "/update_weights",
            "/update_weights_from_disk",
            "/update_weights_from_tensor",
            "/flush_cache",
            "/pause_generation",
            "/continue_generation",
            "/abort_request",
            "/get_weight_version",
        ] {
            assert!(on.contains_key(p), "{p} missing with --enable-rl-control");
            assert!(
                !off.contains_key(p),
                "{p} documented without --enable-rl-control"
            );
        }
        let errors = &on["/update_weights"]["post"]["responses"];
        for status in ["401", "409", "413", "422", "501"] {
            assert!(errors[status].is_object(), "{status}");
        }
        let generate = &on["/generate"]["post"];
        assert_eq!(generate["parameters"][0]["name"], "x-request-id");
        assert!(generate["responses"]["200"]["headers"]["x-request-id"].is_object());
    }

    #[test]
    fn every_route_is_documented() {
        let doc = document(false);
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
