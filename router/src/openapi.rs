//! The OpenAPI document, generated from the handlers and schemas (utoipa), served at
//! /api-doc/openapi.json with Swagger UI at /docs.

use utoipa::OpenApi;

use crate::errors::{ErrorBody, OpenAiErrorBody, OpenAiErrorDetail};
use crate::openai::{
    ChatCompletionRequest, ChatMessageIn, CommonParams, CompletionRequest, ContentPart,
    MessageContent, StreamOptions, StringOrList,
};
use crate::schemas::{
    Details, FinishReason, GenerateParameters, GenerateRequest, GenerateResponse, Info,
    PrefillToken, SimpleToken, StreamDetails, StreamResponse, Token, TokenizeRequest,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tensorgate",
        description = "TGI- and OpenAI-compatible LLM serving"
    ),
    paths(
        crate::server::compat_generate,
        crate::server::generate,
        crate::server::generate_stream,
        crate::server::tokenize,
        crate::server::info,
        crate::server::health,
        crate::server::metrics,
        crate::openai::models,
        crate::openai::completions,
        crate::openai::chat_completions,
    ),
    components(schemas(
        GenerateRequest,
        GenerateParameters,
        GenerateResponse,
        Details,
        Token,
        PrefillToken,
        FinishReason,
        StreamResponse,
        StreamDetails,
        Info,
        TokenizeRequest,
        SimpleToken,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("serializes");
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/",
            "/generate",
            "/generate_stream",
            "/tokenize",
            "/info",
            "/health",
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
    }
}
