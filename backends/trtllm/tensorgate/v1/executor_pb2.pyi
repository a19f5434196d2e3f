from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GrammarKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAMMAR_KIND_UNSPECIFIED: _ClassVar[GrammarKind]
    GRAMMAR_KIND_JSON_SCHEMA: _ClassVar[GrammarKind]
    GRAMMAR_KIND_REGEX: _ClassVar[GrammarKind]
    GRAMMAR_KIND_LARK: _ClassVar[GrammarKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS_TOKEN: _ClassVar[FinishReason]
    FINISH_REASON_STOP_TOKEN: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
GRAMMAR_KIND_UNSPECIFIED: GrammarKind
GRAMMAR_KIND_JSON_SCHEMA: GrammarKind
GRAMMAR_KIND_REGEX: GrammarKind
GRAMMAR_KIND_LARK: GrammarKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS_TOKEN: FinishReason
FINISH_REASON_STOP_TOKEN: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_size", "max_input_tokens", "max_total_tokens", "max_num_tokens", "max_top_n_tokens")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_input_tokens: int
    max_total_tokens: int
    max_num_tokens: int
    max_top_n_tokens: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., max_num_tokens: _Optional[int] = ..., max_top_n_tokens: _Optional[int] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("logprobs", "top_n_tokens", "seed", "top_k", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop_token_ids", "guided_decoding", "min_new_tokens", "logit_bias", "ignore_eos", "prompt_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GUIDED_DECODING_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: bool
    top_n_tokens: bool
    seed: bool
    top_k: bool
    top_p: bool
    typical_p: bool
    repetition_penalty: bool
    frequency_penalty: bool
    presence_penalty: bool
    stop_token_ids: bool
    guided_decoding: bool
    min_new_tokens: bool
    logit_bias: bool
    ignore_eos: bool
    prompt_logprobs: bool
    def __init__(self, logprobs: _Optional[bool] = ..., top_n_tokens: _Optional[bool] = ..., seed: _Optional[bool] = ..., top_k: _Optional[bool] = ..., top_p: _Optional[bool] = ..., typical_p: _Optional[bool] = ..., repetition_penalty: _Optional[bool] = ..., frequency_penalty: _Optional[bool] = ..., presence_penalty: _Optional[bool] = ..., stop_token_ids: _Optional[bool] = ..., guided_decoding: _Optional[bool] = ..., min_new_tokens: _Optional[bool] = ..., logit_bias: _Optional[bool] = ..., ignore_eos: _Optional[bool] = ..., prompt_logprobs: _Optional[bool] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "engine", "dtype", "device", "vocab_size", "eos_token_ids", "limits", "kv_capacity_tokens", "features", "executor_version", "weight_version", "control", "released_memory_tags")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    RELEASED_MEMORY_TAGS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    engine: str
    dtype: str
    device: str
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    limits: Limits
    kv_capacity_tokens: int
    features: Features
    executor_version: str
    weight_version: str
    control: ControlFeatures
    released_memory_tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., engine: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., kv_capacity_tokens: _Optional[int] = ..., features: _Optional[_Union[Features, _Mapping]] = ..., executor_version: _Optional[str] = ..., weight_version: _Optional[str] = ..., control: _Optional[_Union[ControlFeatures, _Mapping]] = ..., released_memory_tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ControlFeatures(_message.Message):
    __slots__ = ("memory_tags", "update_from_disk", "update_from_tensors", "update_from_cuda_ipc", "flush_cache", "pause_in_place")
    MEMORY_TAGS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FROM_DISK_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FROM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FROM_CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    FLUSH_CACHE_FIELD_NUMBER: _ClassVar[int]
    PAUSE_IN_PLACE_FIELD_NUMBER: _ClassVar[int]
    memory_tags: _containers.RepeatedScalarFieldContainer[str]
    update_from_disk: bool
    update_from_tensors: bool
    update_from_cuda_ipc: bool
    flush_cache: bool
    pause_in_place: bool
    def __init__(self, memory_tags: _Optional[_Iterable[str]] = ..., update_from_disk: _Optional[bool] = ..., update_from_tensors: _Optional[bool] = ..., update_from_cuda_ipc: _Optional[bool] = ..., flush_cache: _Optional[bool] = ..., pause_in_place: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ready", "reason")
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    reason: str
    def __init__(self, ready: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("do_sample", "temperature", "top_k", "top_p", "typical_p", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty")
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    typical_p: float
    seed: int
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    def __init__(self, do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., typical_p: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("id", "input_ids", "max_new_tokens", "sampling", "stop_token_ids", "ignore_eos", "return_logprobs", "top_n_tokens", "priority", "grammar", "min_new_tokens", "logit_bias", "return_prompt_logprobs", "resumed_tokens")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    return_logprobs: bool
    top_n_tokens: int
    priority: int
    grammar: Grammar
    min_new_tokens: int
    logit_bias: _containers.ScalarMap[int, float]
    return_prompt_logprobs: bool
    resumed_tokens: int
    def __init__(self, id: _Optional[int] = ..., input_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., return_logprobs: _Optional[bool] = ..., top_n_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., grammar: _Optional[_Union[Grammar, _Mapping]] = ..., min_new_tokens: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., return_prompt_logprobs: _Optional[bool] = ..., resumed_tokens: _Optional[int] = ...) -> None: ...

class Grammar(_message.Message):
    __slots__ = ("kind", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: GrammarKind
    value: str
    def __init__(self, kind: _Optional[_Union[GrammarKind, str]] = ..., value: _Optional[str] = ...) -> None: ...

class GenerateCommand(_message.Message):
    __slots__ = ("requests", "cancel_ids")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_IDS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GenerateRequest]
    cancel_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, requests: _Optional[_Iterable[_Union[GenerateRequest, _Mapping]]] = ..., cancel_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TopTokens(_message.Message):
    __slots__ = ("ids", "logprobs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class RequestOutput(_message.Message):
    __slots__ = ("request_id", "token_ids", "logprobs", "top_tokens", "finish_reason", "error", "prompt_logprobs", "prompt_top_tokens", "weight_version", "cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_tokens: _containers.RepeatedCompositeFieldContainer[TopTokens]
    finish_reason: FinishReason
    error: str
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    prompt_top_tokens: _containers.RepeatedCompositeFieldContainer[TopTokens]
    weight_version: str
    cached_tokens: int
    def __init__(self, request_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_tokens: _Optional[_Iterable[_Union[TopTokens, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., error: _Optional[str] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ..., prompt_top_tokens: _Optional[_Iterable[_Union[TopTokens, _Mapping]]] = ..., weight_version: _Optional[str] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class IterationOutput(_message.Message):
    __slots__ = ("iteration", "outputs")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    outputs: _containers.RepeatedCompositeFieldContainer[RequestOutput]
    def __init__(self, iteration: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[RequestOutput, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("active_requests", "queued_requests", "kv_blocks_used", "kv_blocks_free", "kv_block_size", "last_iteration_ms", "iterations", "requests_received", "requests_finished", "requests_cancelled", "requests_failed", "tokens_generated")
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_ITERATION_MS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    active_requests: int
    queued_requests: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_block_size: int
    last_iteration_ms: float
    iterations: int
    requests_received: int
    requests_finished: int
    requests_cancelled: int
    requests_failed: int
    tokens_generated: int
    def __init__(self, active_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., last_iteration_ms: _Optional[float] = ..., iterations: _Optional[int] = ..., requests_received: _Optional[int] = ..., requests_finished: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., requests_failed: _Optional[int] = ..., tokens_generated: _Optional[int] = ...) -> None: ...

class KvCacheEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KvBlock(_message.Message):
    __slots__ = ("block_hash", "token_ids")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    block_hash: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_hash: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KvBlocksStored(_message.Message):
    __slots__ = ("parent_hash", "blocks")
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    parent_hash: int
    blocks: _containers.RepeatedCompositeFieldContainer[KvBlock]
    def __init__(self, parent_hash: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[KvBlock, _Mapping]]] = ...) -> None: ...

class KvBlocksRemoved(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class KvCacheEvent(_message.Message):
    __slots__ = ("event_id", "stored", "removed", "all_cleared")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    ALL_CLEARED_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    stored: KvBlocksStored
    removed: KvBlocksRemoved
    all_cleared: bool
    def __init__(self, event_id: _Optional[int] = ..., stored: _Optional[_Union[KvBlocksStored, _Mapping]] = ..., removed: _Optional[_Union[KvBlocksRemoved, _Mapping]] = ..., all_cleared: _Optional[bool] = ...) -> None: ...

class KvCacheEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[KvCacheEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[KvCacheEvent, _Mapping]]] = ...) -> None: ...

class MemoryRequest(_message.Message):
    __slots__ = ("tags",)
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tags: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("cuda_ipc", "model_path", "tensors", "finalize", "weight_version", "flush_cache")
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FINALIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLUSH_CACHE_FIELD_NUMBER: _ClassVar[int]
    cuda_ipc: CudaIpcWeights
    model_path: str
    tensors: SerializedTensors
    finalize: bool
    weight_version: str
    flush_cache: bool
    def __init__(self, cuda_ipc: _Optional[_Union[CudaIpcWeights, _Mapping]] = ..., model_path: _Optional[str] = ..., tensors: _Optional[_Union[SerializedTensors, _Mapping]] = ..., finalize: _Optional[bool] = ..., weight_version: _Optional[str] = ..., flush_cache: _Optional[bool] = ...) -> None: ...

class CudaIpcWeights(_message.Message):
    __slots__ = ("handles_by_gpu",)
    class HandlesByGpuEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    HANDLES_BY_GPU_FIELD_NUMBER: _ClassVar[int]
    handles_by_gpu: _containers.ScalarMap[str, bytes]
    def __init__(self, handles_by_gpu: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SerializedTensors(_message.Message):
    __slots__ = ("format", "payloads")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    format: str
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, format: _Optional[str] = ..., payloads: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FlushCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseGenerationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContinueGenerationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControlResponse(_message.Message):
    __slots__ = ("weight_version", "released_memory_tags", "memory_delta_bytes", "tensors_updated", "message")
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RELEASED_MEMORY_TAGS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    weight_version: str
    released_memory_tags: _containers.RepeatedScalarFieldContainer[str]
    memory_delta_bytes: int
    tensors_updated: int
    message: str
    def __init__(self, weight_version: _Optional[str] = ..., released_memory_tags: _Optional[_Iterable[str]] = ..., memory_delta_bytes: _Optional[int] = ..., tensors_updated: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
