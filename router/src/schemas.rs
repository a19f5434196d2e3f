//! Request and response bodies of the TGI-compatible routes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    #[schema(min_length = 1)]
    pub inputs: String,
    #[serde(default, deserialize_with = "crate::extract::strict::object")]
    pub parameters: GenerateParameters,
    /// Only meaningful on `POST /`; accepted everywhere so that TGI clients can send it.
    #[serde(default)]
    pub stream: bool,
}

/// TGI's generation parameters. Unknown fields are rejected rather than ignored.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParameters {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub best_of: Option<u32>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub top_k: Option<i64>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub typical_p: Option<f32>,
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_new_tokens: Option<i64>,
    #[serde(default)]
    pub return_full_text: Option<bool>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub truncate: Option<i64>,
    #[serde(default)]
    pub watermark: bool,
    #[serde(default)]
    pub details: bool,
    #[serde(default)]
    pub decoder_input_details: bool,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub top_n_tokens: Option<u32>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<serde_json::Value>,
    #[serde(default)]
    pub adapter_id: Option<String>,
    /// tensorgate extension: admission priority; higher is admitted first, FIFO within one.
    #[serde(default)]
    #[schema(default = 0)]
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
    pub special: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

/// One server-sent event of `/generate_stream`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    pub top_tokens: Vec<Token>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Info {
    pub model_id: String,
    pub engine: String,
    pub model_dtype: String,
    pub model_device_type: String,
    pub max_concurrent_requests: usize,
    pub max_best_of: u32,
    pub max_stop_sequences: usize,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_batch_size: u32,
    pub max_top_n_tokens: u32,
    pub kv_capacity_tokens: u64,
    pub prompt_format: crate::config::PromptFormat,
    pub router: &'static str,
    pub version: &'static str,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub inputs: String,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}
