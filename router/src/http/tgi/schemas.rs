//! Request and response bodies of the TGI-compatible routes.

use serde::{Deserialize, Serialize};

pub use crate::generation::parameters::GenerateParameters;
pub use crate::generation::stream::{FinishReason, Token};

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The prompt as text. Exactly one of `inputs` and `input_ids` is given.
    #[serde(default)]
    #[schema(min_length = 1)]
    pub inputs: Option<String>,
    /// tensorgate extension (RL rollouts): the prompt as token ids, sent to the engine as they
    /// are; the answer's `details.tokens` are the exact sampled ids.
    #[serde(default)]
    pub input_ids: Option<Vec<u32>>,
    #[serde(default, deserialize_with = "crate::http::extract::strict::object")]
    pub parameters: GenerateParameters,
    /// Only meaningful on `POST /`; accepted everywhere so that TGI clients can send it.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

/// One of the other sequences of a `best_of` request (TGI's shape).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
    /// With `decoder_input_details`: the prompt's tokens, the first with a null logprob.
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    /// With `best_of` > 1: the sequences that were not the best.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
    /// tensorgate extension (RL rollouts): the label of the weights that produced the last
    /// token (see /get_weight_version).
    pub weight_version: String,
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
    /// tensorgate extension (RL rollouts): the label of the weights that produced the last
    /// token.
    pub weight_version: String,
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
    /// The label of the weights loaded now (changed by the rollout-control updates).
    pub weight_version: String,
    /// Engine memory released now (/release_memory); generation answers 503 `sleeping` while
    /// any is.
    pub released_memory_tags: Vec<String>,
    /// What the rollout-control routes can do on this engine (served only with
    /// --enable-rl-control).
    pub rl_control: RlControlInfo,
    /// How requests are spread over the workers (--routing).
    pub routing: &'static str,
    /// The executors behind the router, their state and load.
    pub workers: Vec<crate::executors::pool::WorkerStatus>,
}

/// Info's view of the engine's rollout-control abilities.
#[derive(Debug, Clone, Serialize, Default, utoipa::ToSchema)]
pub struct RlControlInfo {
    /// The control routes are served (--enable-rl-control).
    pub enabled: bool,
    /// Memory tags /release_memory and /resume_memory take.
    pub memory_tags: Vec<String>,
    pub update_from_disk: bool,
    pub update_from_tensors: bool,
    pub update_from_cuda_ipc: bool,
    pub flush_cache: bool,
    pub pause_in_place: bool,
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

/// `POST /chat_tokenize`'s answer (TGI's shape).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChatTokenizeResponse {
    pub tokenize_response: Vec<SimpleToken>,
    pub templated_text: String,
}
