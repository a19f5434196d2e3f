//! Bodies of the rollout-control routes. trtllm-serve's routes take its bodies exactly
//! (tensorrt_llm/serve/openai_protocol.py: `MemoryUpdateRequest`, `UpdateWeightsRequest`;
//! served by tensorrt_llm/serve/openai_server.py `release_memory`, `resume_memory`,
//! `update_weights`), with two documented extensions; the others take SGLang's
//! (python/sglang/srt/managers/io_struct.py: `UpdateWeightFromDiskReqInput`,
//! `UpdateWeightsFromTensorReqInput`, `PauseGenerationReqInput`, `AbortReq`; served by
//! python/sglang/srt/entrypoints/http_server.py). Unknown fields are refused (422 naming them)
//! rather than ignored.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// Bytes sent as base64 (standard alphabet, padding optional), decoded while the body is
/// parsed: a bad string is refused naming its place in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base64(pub Vec<u8>);

const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

impl<'de> Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct B64;
        impl Visitor<'_> for B64 {
            type Value = Base64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a base64 string")
            }
            // Borrowed or not, the string is decoded in place: no copy of it is kept.
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Base64, E> {
                BASE64
                    .decode(s)
                    .map(Base64)
                    .map_err(|e| E::custom(format!("not valid base64: {e}")))
            }
        }
        d.deserialize_str(B64)
    }
}

/// `POST /release_memory`, `POST /resume_memory`: trtllm-serve's `MemoryUpdateRequest`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryRequest {
    /// Memory to release or take back: `kv_cache` (the KV cache), `model` (the weights).
    /// Absent, null or empty: every tag the engine has (`/info` `memory_tags`).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// `POST /update_weights`: trtllm-serve's `UpdateWeightsRequest`, sent once per bucket and
/// then with `"weights": null` (or no `weights`) to finish.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWeightsRequest {
    /// GPU UUID → base64 of the pickled list of (parameter name, CUDA IPC handle) for that
    /// GPU, as tensorrt_llm/llmapi/rlhf_utils.py `WorkerExtension.update_weights` takes it.
    /// null: the buckets are complete (post-load hooks run, the prefix cache is reset, and
    /// generation resumes).
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub weights: Option<BTreeMap<String, Base64>>,
    /// tensorgate extension, on the finishing call only: the label of the new weights
    /// (default: the number of updates applied so far).
    #[serde(default)]
    pub weight_version: Option<String>,
    /// tensorgate extension: abort the requests in flight instead of waiting for them.
    #[serde(default)]
    pub abort_all_requests: bool,
}

/// `POST /update_weights_from_disk`: SGLang's `UpdateWeightFromDiskReqInput`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateFromDiskRequest {
    /// A Hugging Face checkpoint directory of the served architecture, on the server's disk.
    pub model_path: String,
    /// `null` or `auto`: the checkpoint's own format (safetensors).
    #[serde(default)]
    pub load_format: Option<String>,
    /// The label of the new weights (default: the number of updates applied so far).
    #[serde(default)]
    pub weight_version: Option<String>,
    /// Abort the requests in flight instead of waiting for them.
    #[serde(default)]
    pub abort_all_requests: bool,
    /// Drop cached prefixes after the update (SGLang's default: true).
    #[serde(default = "yes")]
    pub flush_cache: bool,
}

/// `POST /update_weights_from_tensor`: SGLang's `UpdateWeightsFromTensorReqInput`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateFromTensorRequest {
    /// Each item base64 of some named tensors, serialized as `load_format` says; together
    /// any subset of the model's parameters.
    #[schema(value_type = Vec<String>)]
    pub serialized_named_tensors: Vec<Base64>,
    /// `safetensors` (default) or `pickle` (torch tensors, read by the executor's restricted
    /// unpickler; SGLang's own MultiprocessingSerializer output is not accepted).
    #[serde(default)]
    pub load_format: Option<String>,
    /// Drop cached prefixes after the update (SGLang's default: true).
    #[serde(default = "yes")]
    pub flush_cache: bool,
    /// The label of the new weights (default: the number of updates applied so far).
    #[serde(default)]
    pub weight_version: Option<String>,
    /// Abort the requests in flight instead of waiting for them.
    #[serde(default)]
    pub abort_all_requests: bool,
}

fn yes() -> bool {
    true
}

/// `POST /pause_generation`: SGLang's `PauseGenerationReqInput`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// `abort` (default): abort the requests in flight; `in_place`: the engine keeps them
    /// (and their KV cache) and resumes them on /continue_generation. New requests wait in
    /// either mode. SGLang's `retract` is not served.
    #[serde(default)]
    pub mode: Option<String>,
}

/// `POST /continue_generation`, `POST /flush_cache`: no fields.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

/// `POST /abort_request`: SGLang's `AbortReq`: one request by the `x-request-id` its
/// response carried, or all of them.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortRequest {
    #[serde(default)]
    pub rid: Option<String>,
    #[serde(default)]
    pub abort_all: bool,
}

/// Every control route's answer (SGLang's `{success, message}`, with the weights' label).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ControlResponse {
    pub success: bool,
    pub message: String,
    /// The label of the weights loaded now.
    pub weight_version: String,
    /// `"success"` on trtllm-serve's routes, as trtllm-serve answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// /release_memory, /resume_memory: the tags released after the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_memory_tags: Option<Vec<String>>,
    /// /release_memory, /resume_memory: bytes freed (negative: taken back), as the engine
    /// measured them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_delta_bytes: Option<i64>,
    /// Weight updates: tensors written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors_updated: Option<u32>,
    /// Generations aborted by the call (updates with abort_all_requests, pauses, aborts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_aborted_requests: Option<usize>,
}

/// `GET /get_weight_version` (SGLang's).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WeightVersion {
    pub weight_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_decoded_and_bad_strings_are_refused() {
        let ok: UpdateFromTensorRequest =
            serde_json::from_str(r#"{"serialized_named_tensors": ["aGk=", "aGk"]}"#)
                .expect("padding optional");
        assert_eq!(ok.serialized_named_tensors[0].0, b"hi");
        assert_eq!(ok.serialized_named_tensors[1].0, b"hi");
        assert!(ok.flush_cache, "SGLang's default");
        let e = serde_json::from_str::<UpdateFromTensorRequest>(
            r#"{"serialized_named_tensors": ["aGk=", "a$b"]}"#,
        )
        .expect_err("bad base64");
        assert!(e.to_string().contains("not valid base64"), "{e}");
        let e =
            serde_json::from_str::<UpdateFromTensorRequest>(r#"{"serialized_named_tensors": [5]}"#)
                .expect_err("not a string");
        assert!(e.to_string().contains("a base64 string"), "{e}");
    }

    #[test]
    fn trtllm_bodies_parse_as_trtllm_sends_them() {
        let bucket: UpdateWeightsRequest =
            serde_json::from_str(r#"{"weights": {"GPU-1234": "AAEC"}}"#).expect("bucket");
        let weights = bucket.weights.expect("weights");
        assert_eq!(weights["GPU-1234"].0, vec![0, 1, 2]);
        let finish: UpdateWeightsRequest =
            serde_json::from_str(r#"{"weights": null}"#).expect("finalize");
        assert!(finish.weights.is_none());
        let memory: MemoryRequest =
            serde_json::from_str(r#"{"tags": ["model", "kv_cache"]}"#).expect("tags");
        assert_eq!(memory.tags.map(|t| t.len()), Some(2));
        let e = serde_json::from_str::<MemoryRequest>(r#"{"tag": ["model"]}"#).expect_err("typo");
        assert!(e.to_string().contains("unknown field `tag`"), "{e}");
    }
}
