//! The generation parameters of a request: TGI's `parameters` object, which the OpenAI
//! routes fill from their own fields so that one validator checks both families.

use serde::Deserialize;

/// TGI's generation parameters. Unknown fields are rejected rather than ignored.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParameters {
    /// Sample this many sequences and answer the best (TGI); at most `max_best_of` (/info).
    #[serde(default)]
    #[schema(minimum = 1)]
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
    /// Generation cannot end (end-of-sequence or a stop token) before this many tokens.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub min_new_tokens: Option<i64>,
    /// Token ids that end the generation, besides the model's end-of-sequence ids.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Generate past end-of-sequence (up to `max_new_tokens`).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Token id (as a string, as OpenAI writes it) → bias added to its logit, in [-100, 100].
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// A grammar set by the OpenAI routes (`response_format`, `guided_*`), with the field it
    /// came from; TGI requests use `grammar`.
    #[serde(skip)]
    pub guided: Option<(crate::generation::guided::GrammarSpec, &'static str)>,
    /// tensorgate extension: admission priority; higher is admitted first, FIFO within one.
    #[serde(default)]
    #[schema(default = 0)]
    pub priority: Option<i32>,
}
