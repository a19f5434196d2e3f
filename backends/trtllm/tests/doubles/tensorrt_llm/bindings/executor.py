"""!!! TEST DOUBLE — THIS IS NOT TENSORRT-LLM AND RUNS NO MODEL, NO TENSORRT, NO GPU CODE !!!

A pure-Python stand-in for `tensorrt_llm.bindings.executor`, used only by tensorgate's tests
(they install it into `sys.modules`). It reproduces the names, constructor signatures
(positional/keyword-only split, defaults) and the response semantics that tensorgate's trtllm
engine relies on, as the real bindings define them in NVIDIA/TensorRT-LLM:

- `cpp/tensorrt_llm/nanobind/executor/request.cpp` (commit 008b2b8d23af): SamplingConfig
  (`beam_width` positional, the rest keyword-only: top_k, top_p, seed, temperature,
  repetition/presence/frequency_penalty, min_p, ...; there is no typical_p), OutputConfig,
  Request (`input_token_ids`, `max_tokens` positional, the rest keyword-only), FinishReason
  (NOT_FINISHED, END_ID, STOP_WORDS, LENGTH, TIMED_OUT, CANCELLED), Result (is_final,
  output_token_ids, log_probs, cum_log_probs, finish_reasons, request_perf_metrics, ...),
  RequestPerfMetrics and its KvCacheMetrics (num_reused_blocks, ...), Response (request_id,
  has_error(), error_msg, result);
- `cpp/tensorrt_llm/nanobind/executor/executor.cpp` (commit 1dd50d0741fa): Executor(model_path,
  model_type, executor_config), enqueue_request(s), await_responses(timeout=None | id | ids),
  get_num_responses_ready, cancel_request, get_latest_iteration_stats, can_enqueue_requests,
  shutdown;
- `cpp/tensorrt_llm/nanobind/executor/executorConfig.cpp` (commit 008b2b8d23af):
  ExecutorConfig, SchedulerConfig(capacity_scheduler_policy=GUARANTEED_NO_EVICT, ...),
  KvCacheConfig(enable_block_reuse=True, ..., free_gpu_memory_fraction=None, ...),
  ParallelConfig;
- `cpp/tensorrt_llm/nanobind/executor/bindings.cpp` (commit 01315fdb274c): ModelType,
  CapacitySchedulerPolicy, CommunicationType/Mode, KvCacheStats (max/free/used_num_blocks,
  tokens_per_block), InflightBatchingStats, IterationStats.

Response semantics reproduced (from `docs/source/executor.md`, the examples in
`examples/bindings/executor/`, and how `tensorrt_llm/executor/result.py` reads responses):

- streaming requests get one Result per iteration holding only the new tokens of that
  iteration in `output_token_ids[beam]` (input tokens never appear); `is_final` is set on the
  last one, whose `finish_reasons[beam]` says why (NOT_FINISHED before that);
- END_ID: the end token itself is not returned; STOP_WORDS: the stop word's tokens are the last
  tokens returned; LENGTH: `max_tokens` tokens were returned;
- `end_id=-1` disables the end token (what TensorRT-LLM's LLM API does for `ignore_eos`);
- `cancel_request(id)` makes the request end at the next iteration with a final Result whose
  finish reason is CANCELLED; unknown ids are ignored;
- a request that fails gets a Response with `has_error()` true and `error_msg` set, and no
  further responses; reading `result` of such a response raises, as in C++;
- where each error surfaces is where the C++ raises it (commit 036a60f7ff92 of
  `cpp/tensorrt_llm/executor/executorImpl.cpp` unless said otherwise):
  * the constructors: `Request` with no input tokens or `max_tokens < 1`
    (`cpp/tensorrt_llm/executor/requestImpl.h`, `Request::Impl::validate`: TLLM_CHECK
    `!mInputTokenIds.empty()`, `mMaxNewTokens > 0`); `SamplingConfig` with `top_p` outside
    (0, 1], negative `top_k`, `repetition_penalty <= 0` (`cpp/tensorrt_llm/executor/
    samplingConfig.cpp`, checkTopP / checkTopK / checkRepetitionPenalty);
  * `enqueue_request(s)` raises only after `shutdown()` ("Shutdown called, cannot enqueue
    requests") or on a rank that is not the leader (`checkParallelApiUsage`); it does NOT
    validate the request against the engine;
  * the request's first response instead carries the error (`fetchNewRequests`: "Encountered
    an error when fetching new request: ..."), for a prompt longer than the executor's max
    input length or an `end_id` outside [-1, vocab size) (`LlmRequest::validate`,
    `cpp/tensorrt_llm/batch_manager/llmRequest.cpp`), and for a streaming request under a
    policy other than GUARANTEED_NO_EVICT without chunked context whose prompt + max_tokens
    - 1 exceeds the max input length (`fetchNewRequests`); prompt + max_tokens beyond
    max_seq_len is clamped (`LlmRequest::validate`, with a warning);
  * the executor's max input length is `max_seq_len - 1` with chunked context,
    `min(max_seq_len - 1, max_num_tokens)` with context FMHA and packed input, else
    `build_config.max_input_len` (`cpp/tensorrt_llm/batch_manager/
    trtGptModelInflightBatching.cpp`, constructor); chunked context stays off unless the engine
    has paged context FMHA (`checkOptionalParams`);
  * after `shutdown()`, `await_responses`, `cancel_request`, `get_num_responses_ready` and
    `get_latest_iteration_stats` raise ("Shutdown called"); `can_enqueue_requests()` is False;
    a second `shutdown()` returns at once (`Executor::Impl::shutdown`);
  * on a non-leader rank (`TEST_DOUBLE.can_enqueue = False`) every one of those calls raises
    (`checkParallelApiUsage`: "Check that the current process is the leader or
    orchestrator", executorImpl.h) and `can_enqueue_requests()` is False (`canEnqueueRequests`);
- `OutputConfig(return_context_logits=True)` needs an engine built with gather_context_logits:
  otherwise the request's first response is the error "Return context logit need to build
  engine with gather_context_logits" (`Executor::Impl::fetchNewRequests`); with it, every
  Result of the request carries `context_logits`, a [prompt tokens, vocab] tensor on the host
  (`LlmRequest::createResult`, `cpp/tensorrt_llm/batch_manager/llmRequest.cpp`); the double's
  values are `double_context_logits(prompt, vocab)`;
- `Result.log_probs[beam]` of a streamed result is cumulative, all tokens' so far, while
  `output_token_ids[beam]` holds the new tokens (`tensorrt_llm/executor/result.py`,
  `_handle_sequence`: `output.logprobs = response_tensors.log_probs[src_idx]`, then
  `assert len(output.logprobs) == output.length`);
- requests wait in priority order, higher first, FIFO within one (`insertRequestInOrder`);
- `get_latest_iteration_stats()` returns (and drains) the IterationStats recorded since the
  last call; `num_queued_requests` counts the requests not yet scheduled
  (`getCurrentIterationStats`).

What the double does NOT reproduce: any real model (tokens come from a deterministic function
of the prompt and the step), TensorRT, CUDA, MPI ranks, beam search, generation logits, speculative
decoding, LoRA, guided decoding, or the exact wording of TensorRT-LLM's error messages.

Test-only knobs live in `TEST_DOUBLE` (not part of the real API).
"""

from __future__ import annotations

import datetime
import enum
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__version__ = "1.0.0+tensorgate.test-double"
IS_TEST_DOUBLE = True


# ---------------------------------------------------------------------------------------------
# Test-only controls (not part of TensorRT-LLM's API)


@dataclass
class DoubleSettings:
    """Knobs the tests turn. Reset by `reset()` between tests."""

    iteration_ms: float = 1.0
    # (input_token_ids, step) -> token id; None: a deterministic default that avoids end ids.
    token_fn: Callable[[list[int], int], int] | None = None
    # first input token -> step at which the request fails with an error response
    fail_at: dict[int, int] = field(default_factory=dict)
    fail_message: str = "test double: simulated failure in the executor"
    # first input token -> step at which the request ends with FinishReason.TIMED_OUT, as the
    # real executor ends a request whose `allotted_time_ms` has passed
    time_out_at: dict[int, int] = field(default_factory=dict)
    # first input token -> how many log probabilities each of its results leaves out (a result
    # whose log_probs are shorter than its tokens)
    short_log_probs: dict[int, int] = field(default_factory=dict)
    kv_blocks: int = 512
    can_enqueue: bool = True
    # Every Executor built and every Request enqueued, for assertions.
    executors: list[Executor] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # Raised by the Executor constructor when set (e.g. simulate an unloadable engine).
    constructor_error: str | None = None
    # Results without `finish_reasons`, as in the early 0.x bindings (Result had only
    # is_final, output_token_ids, log probs and logits).
    legacy_results: bool = False
    # Reported as InflightBatchingStats.num_paused_requests (the double evicts nothing).
    paused_requests: int = 0
    # Prompt lengths whose results leave `context_logits` out although it was asked for.
    no_context_logits_for: set[int] = field(default_factory=set)
    # first input token -> KV blocks its context reused from the prefix cache, reported in
    # `Result.request_perf_metrics` when OutputConfig(return_perf_metrics=True) (the double
    # caches nothing itself)
    reused_blocks: dict[int, int] = field(default_factory=dict)


TEST_DOUBLE = DoubleSettings()


def reset() -> None:
    global TEST_DOUBLE
    for ex in TEST_DOUBLE.executors:
        ex._stop_thread()
    TEST_DOUBLE = DoubleSettings()


# ---------------------------------------------------------------------------------------------
# Enums (bindings.cpp, request.cpp, executorConfig.cpp)


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1
    STATIC_BATCH = 2


class ContextChunkingPolicy(enum.Enum):
    EQUAL_PROGRESS = 0
    FIRST_COME_FIRST_SERVED = 1


class CommunicationType(enum.Enum):
    MPI = 0


class CommunicationMode(enum.Enum):
    LEADER = 0
    ORCHESTRATOR = 1


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


# ---------------------------------------------------------------------------------------------
# Configs (executorConfig.cpp)


class SchedulerConfig:
    def __init__(
        self,
        capacity_scheduler_policy: CapacitySchedulerPolicy = (
            CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
        ),
        context_chunking_policy: ContextChunkingPolicy | None = None,
        dynamic_batch_config: object | None = None,
    ) -> None:
        _check_enum("capacity_scheduler_policy", capacity_scheduler_policy, CapacitySchedulerPolicy)
        self._policy = capacity_scheduler_policy
        self._chunking = context_chunking_policy
        self._dynamic = dynamic_batch_config

    @property
    def capacity_scheduler_policy(self) -> CapacitySchedulerPolicy:
        return self._policy

    @property
    def context_chunking_policy(self) -> ContextChunkingPolicy | None:
        return self._chunking

    @property
    def dynamic_batch_config(self) -> object | None:
        return self._dynamic


class KvCacheConfig:
    def __init__(
        self,
        enable_block_reuse: bool = True,
        max_tokens: int | None = None,
        max_attention_window: list[int] | None = None,
        sink_token_length: int | None = None,
        free_gpu_memory_fraction: float | None = None,
        host_cache_size: int | None = None,
        onboard_blocks: bool = True,
        cross_kv_cache_fraction: float | None = None,
        secondary_offload_min_priority: int | None = None,
        event_buffer_max_size: int = 0,
        *,
        enable_partial_reuse: bool = True,
        copy_on_partial_reuse: bool = True,
        use_uvm: bool = False,
        runtime_defaults: object | None = None,
    ) -> None:
        if free_gpu_memory_fraction is not None and not 0.0 < free_gpu_memory_fraction <= 1.0:
            raise RuntimeError("freeGpuMemoryFraction must be in (0, 1]")
        self.enable_block_reuse = bool(enable_block_reuse)
        self.max_tokens = max_tokens
        self.max_attention_window = max_attention_window
        self.sink_token_length = sink_token_length
        self.free_gpu_memory_fraction = free_gpu_memory_fraction
        self.host_cache_size = host_cache_size
        self.onboard_blocks = onboard_blocks
        self.cross_kv_cache_fraction = cross_kv_cache_fraction
        self.secondary_offload_min_priority = secondary_offload_min_priority
        self.event_buffer_max_size = event_buffer_max_size
        self.enable_partial_reuse = enable_partial_reuse
        self.copy_on_partial_reuse = copy_on_partial_reuse
        self.use_uvm = use_uvm


class OrchestratorConfig:
    def __init__(
        self,
        is_orchestrator: bool = True,
        worker_executable_path: str = "",
        orch_leader_comm: object | None = None,
        spawn_processes: bool = True,
    ) -> None:
        self.is_orchestrator = is_orchestrator
        self.worker_executable_path = worker_executable_path
        self.orch_leader_comm = orch_leader_comm
        self.spawn_processes = spawn_processes


class ParallelConfig:
    def __init__(
        self,
        communication_type: CommunicationType = CommunicationType.MPI,
        communication_mode: CommunicationMode = CommunicationMode.LEADER,
        device_ids: list[int] | None = None,
        participant_ids: list[int] | None = None,
        orchestrator_config: OrchestratorConfig | None = None,
        num_nodes: int | None = None,
    ) -> None:
        self.communication_type = communication_type
        self.communication_mode = communication_mode
        self.device_ids = device_ids
        self.participant_ids = participant_ids
        self.orchestrator_config = orchestrator_config
        self.num_nodes = num_nodes


class ExecutorConfig:
    """The keyword names and defaults of the real constructor (a subset of the trailing ones
    is accepted: enough for tensorgate; an unknown keyword raises TypeError as in Python)."""

    def __init__(
        self,
        max_beam_width: int = 1,
        scheduler_config: SchedulerConfig | None = None,
        kv_cache_config: KvCacheConfig | None = None,
        enable_chunked_context: bool = False,
        normalize_log_probs: bool = True,
        iter_stats_max_iterations: int = 1000,
        request_stats_max_iterations: int = 0,
        batching_type: BatchingType = BatchingType.INFLIGHT,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        parallel_config: ParallelConfig | None = None,
        peft_cache_config: object | None = None,
        logits_post_processor_config: object | None = None,
        decoding_config: object | None = None,
        use_gpu_direct_storage: bool = False,
        gpu_weights_percent: float = 1.0,
        max_queue_size: int | None = None,
    ) -> None:
        if max_beam_width < 1:
            raise RuntimeError("maxBeamWidth must be at least 1")
        _check_enum("batching_type", batching_type, BatchingType)
        self.max_beam_width = max_beam_width
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.kv_cache_config = kv_cache_config or KvCacheConfig()
        self.enable_chunked_context = enable_chunked_context
        self.normalize_log_probs = normalize_log_probs
        self.iter_stats_max_iterations = iter_stats_max_iterations
        self.request_stats_max_iterations = request_stats_max_iterations
        self.batching_type = batching_type
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.parallel_config = parallel_config
        self.peft_cache_config = peft_cache_config
        self.logits_post_processor_config = logits_post_processor_config
        self.decoding_config = decoding_config
        self.use_gpu_direct_storage = use_gpu_direct_storage
        self.gpu_weights_percent = gpu_weights_percent
        self.max_queue_size = max_queue_size


# ---------------------------------------------------------------------------------------------
# Requests and responses (request.cpp)


class SamplingConfig:
    def __init__(
        self,
        beam_width: int = 1,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        top_p_min: float | None = None,
        top_p_reset_ids: int | None = None,
        top_p_decay: float | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        min_tokens: int | None = None,
        beam_search_diversity_rate: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        length_penalty: float | None = None,
        early_stopping: int | None = None,
        no_repeat_ngram_size: int | None = None,
        num_return_sequences: int | None = None,
        min_p: float | None = None,
        beam_width_array: list[int] | None = None,
    ) -> None:
        # The C++ constructor checks its arguments and throws on invalid values.
        if beam_width < 1:
            raise RuntimeError("beamWidth must be at least 1")
        if top_k is not None and top_k < 0:
            raise RuntimeError("topK must be non-negative")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: topP.value() > 0.f")
        if temperature is not None and temperature < 0.0:
            raise RuntimeError("temperature must be non-negative")
        if repetition_penalty is not None and repetition_penalty <= 0.0:
            raise RuntimeError("repetitionPenalty must be positive")
        if seed is not None and not 0 <= seed < 2**64:
            raise OverflowError("seed does not fit an unsigned 64-bit integer")
        self.beam_width = beam_width
        self.top_k = top_k
        self.top_p = top_p
        self.top_p_min = top_p_min
        self.top_p_reset_ids = top_p_reset_ids
        self.top_p_decay = top_p_decay
        self.seed = seed
        self.temperature = temperature
        self.min_tokens = min_tokens
        self.beam_search_diversity_rate = beam_search_diversity_rate
        self.repetition_penalty = repetition_penalty
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.num_return_sequences = num_return_sequences
        self.min_p = min_p
        self.beam_width_array = beam_width_array


class OutputConfig:
    def __init__(
        self,
        return_log_probs: bool = False,
        return_context_logits: bool = False,
        return_generation_logits: bool = False,
        exclude_input_from_output: bool = False,
        return_encoder_output: bool = False,
        return_perf_metrics: bool = False,
        additional_model_outputs: list | None = None,
    ) -> None:
        self.return_log_probs = return_log_probs
        self.return_context_logits = return_context_logits
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output
        self.return_encoder_output = return_encoder_output
        self.return_perf_metrics = return_perf_metrics
        self.additional_model_outputs = additional_model_outputs


class Request:
    BATCHED_POST_PROCESSOR_NAME = "batched"
    # The real default priority (tle::Request::kDefaultPriority).
    DEFAULT_PRIORITY = 0.5

    def __init__(
        self,
        input_token_ids: list[int],
        max_tokens: int,
        *,
        streaming: bool = False,
        sampling_config: SamplingConfig | None = None,
        output_config: OutputConfig | None = None,
        end_id: int | None = None,
        pad_id: int | None = None,
        position_ids: list[int] | None = None,
        bad_words: list[list[int]] | None = None,
        stop_words: list[list[int]] | None = None,
        embedding_bias: object | None = None,
        external_draft_tokens_config: object | None = None,
        prompt_tuning_config: object | None = None,
        multimodal_input: object | None = None,
        multimodal_embedding: object | None = None,
        mrope_config: object | None = None,
        lora_config: object | None = None,
        lookahead_config: object | None = None,
        kv_cache_retention_config: object | None = None,
        logits_post_processor_name: str | None = None,
        logits_post_processor: object | None = None,
        encoder_input_token_ids: list[int] | None = None,
        client_id: int | None = None,
        return_all_generated_tokens: bool = False,
        priority: float = 0.5,
        type: object | None = None,  # the real keyword is `type`
        context_phase_params: object | None = None,
        encoder_input_features: object | None = None,
        encoder_output_length: int | None = None,
        cross_attention_mask: object | None = None,
        num_return_sequences: int = 1,
        eagle_config: object | None = None,
        skip_cross_attn_blocks: object | None = None,
        guided_decoding_params: object | None = None,
        language_adapter_uid: int | None = None,
        allotted_time_ms: object | None = None,
    ) -> None:
        # nanobind converts to std::vector<int32>: a non-integer element is a TypeError.
        self.input_token_ids = [_int32("input_token_ids", t) for t in input_token_ids]
        self.max_tokens = _int32("max_tokens", max_tokens)
        # Request::Impl::validate (requestImpl.h), run by the constructor.
        if not self.input_token_ids:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: !mInputTokenIds.empty()")
        if self.max_tokens <= 0:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: mMaxNewTokens > 0")
        self.streaming = bool(streaming)
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id = None if end_id is None else _int32("end_id", end_id)
        self.pad_id = None if pad_id is None else _int32("pad_id", pad_id)
        self.bad_words = _word_list("bad_words", bad_words)
        self.stop_words = _word_list("stop_words", stop_words)
        self.client_id = client_id
        self.return_all_generated_tokens = return_all_generated_tokens
        if not 0.0 <= priority <= 1.0:
            raise RuntimeError("priority must be in [0, 1]")
        self.priority = priority
        self.guided_decoding_params = guided_decoding_params


class KvCacheMetrics:
    """RequestPerfMetrics::KvCacheMetrics (request.cpp): per-request block counts."""

    def __init__(self) -> None:
        self.num_total_allocated_blocks = 0
        self.num_new_allocated_blocks = 0
        self.num_reused_blocks = 0
        self.num_missed_blocks = 0
        self.kv_cache_hit_rate = 0.0


class RequestPerfMetrics:
    """Result.request_perf_metrics (request.cpp), set on every result of a request whose
    OutputConfig has return_perf_metrics (LlmRequest::createResult, llmRequest.cpp). Only the KV
    metrics are filled here."""

    def __init__(self) -> None:
        self.timing_metrics = None
        self.kv_cache_metrics = KvCacheMetrics()
        self.speculative_decoding = None
        self.first_iter = None
        self.last_iter = None
        self.iter = None


class Result:
    def __init__(self) -> None:
        self.is_final = False
        self.output_token_ids: list[list[int]] = []
        self.cum_log_probs: list[float] | None = None
        self.log_probs: list[list[float]] | None = None
        self.context_logits = None
        self.generation_logits = None
        self.encoder_output = None
        self.finish_reasons: list[FinishReason] = []
        self.sequence_index = 0
        self.is_sequence_final = False
        self.decoding_iter = 0
        self.context_phase_params = None
        self.request_perf_metrics = None


class Response:
    def __init__(
        self, request_id: int, error_msg_or_result: str | Result, client_id: int | None = None
    ) -> None:
        self._request_id = request_id
        self._client_id = client_id
        if isinstance(error_msg_or_result, Result):
            self._result: Result | None = error_msg_or_result
            self._error: str | None = None
        else:
            self._result = None
            self._error = str(error_msg_or_result)

    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def client_id(self) -> int | None:
        return self._client_id

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error_msg(self) -> str:
        if self._error is None:
            raise RuntimeError("Cannot get the error message for a response without error")
        return self._error

    @property
    def result(self) -> Result:
        if self._result is None:
            raise RuntimeError("Cannot get the result for a response with an error")
        return self._result


# ---------------------------------------------------------------------------------------------
# Stats (bindings.cpp)


class KvCacheStats:
    def __init__(self) -> None:
        self.max_num_blocks = 0
        self.free_num_blocks = 0
        self.used_num_blocks = 0
        self.tokens_per_block = 0
        self.alloc_total_blocks = 0
        self.alloc_new_blocks = 0
        self.reused_blocks = 0
        self.missed_blocks = 0
        self.cache_hit_rate = 0.0


class InflightBatchingStats:
    def __init__(self) -> None:
        self.num_scheduled_requests = 0
        self.num_context_requests = 0
        self.num_gen_requests = 0
        self.num_paused_requests = 0
        self.num_ctx_tokens = 0
        self.micro_batch_id = 0
        self.avg_num_decoded_tokens_per_iter = 0.0


class IterationStats:
    def __init__(self) -> None:
        self.timestamp = ""
        self.iter = 0
        self.iter_latency_ms = 0.0
        self.new_active_requests_queue_latency_ms = 0.0
        self.num_new_active_requests = 0
        self.num_active_requests = 0
        self.num_queued_requests = 0
        self.num_completed_requests = 0
        self.max_num_active_requests = 0
        self.gpu_mem_usage = 0
        self.cpu_mem_usage = 0
        self.pinned_mem_usage = 0
        self.kv_cache_stats: KvCacheStats | None = None
        self.cross_kv_cache_stats: KvCacheStats | None = None
        self.static_batching_stats = None
        self.inflight_batching_stats: InflightBatchingStats | None = None
        self.specdec_stats = None


# ---------------------------------------------------------------------------------------------
# The executor (executor.cpp), simulated by one background thread


@dataclass
class _Live:
    rid: int
    request: Request
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    blocks: int = 0


class Executor:
    def __init__(
        self, model_path: str | Path, model_type: ModelType, executor_config: ExecutorConfig
    ) -> None:
        if TEST_DOUBLE.constructor_error:
            raise RuntimeError(TEST_DOUBLE.constructor_error)
        _check_enum("model_type", model_type, ModelType)
        if not isinstance(executor_config, ExecutorConfig):
            raise TypeError("executor_config must be an ExecutorConfig")
        engine_dir = Path(model_path)
        config_path = engine_dir / "config.json"
        if not config_path.is_file():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] cannot open {config_path}")
        config = json.loads(config_path.read_text())
        build = config["build_config"]
        pretrained = config["pretrained_config"]
        self.config = executor_config
        self.model_path = engine_dir
        self.vocab_size = int(pretrained["vocab_size"])
        self.max_seq_len = int(build["max_seq_len"])
        self.gather_context_logits = build.get("gather_context_logits") is True
        plugin = build.get("plugin_config") or {}
        # checkOptionalParams: chunked context needs paged context FMHA, else it is turned off.
        self.chunked_context = bool(
            executor_config.enable_chunked_context and plugin.get("use_paged_context_fmha")
        )
        # trtGptModelInflightBatching.cpp (constructor): the executor's max input length.
        max_num_tokens = int(executor_config.max_num_tokens or build["max_num_tokens"])
        if self.chunked_context:
            self.max_input_len = self.max_seq_len - 1
        elif plugin.get("context_fmha", True) and plugin.get("remove_input_padding", True):
            self.max_input_len = min(self.max_seq_len - 1, max_num_tokens)
        else:
            self.max_input_len = int(build["max_input_len"])
        policy = executor_config.scheduler_config.capacity_scheduler_policy
        self.guaranteed_no_evict = policy == CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
        self.max_batch_size = int(executor_config.max_batch_size or build["max_batch_size"])
        self.tokens_per_block = int(
            (build.get("plugin_config") or {}).get("tokens_per_block") or 32
        )
        self.max_num_blocks = TEST_DOUBLE.kv_blocks
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._waiting: deque[_Live] = deque()
        self._active: dict[int, _Live] = {}
        self._all: dict[int, _Live] = {}
        self._ready: list[Response] = []
        self._stats: deque[IterationStats] = deque(
            maxlen=max(executor_config.iter_stats_max_iterations, 1)
        )
        self._iter = 0
        self._stopped = False
        self._shutdown_called = False
        self.shutdown_called = False
        self._thread = threading.Thread(target=self._loop, name="trtllm-double", daemon=True)
        self._thread.start()
        TEST_DOUBLE.executors.append(self)

    # -- the real API -----------------------------------------------------------------------

    def can_enqueue_requests(self) -> bool:
        # canEnqueueRequests: not shut down, and the leader (leader mode).
        return TEST_DOUBLE.can_enqueue and not self._shutdown_called

    def _check_usable(self, what: str) -> None:
        # TLLM_CHECK_WITH_INFO(!mShutdownCalled, ...) then checkParallelApiUsage(__func__).
        if self._shutdown_called:
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: {what}")
        if not TEST_DOUBLE.can_enqueue:
            raise RuntimeError(
                "[TensorRT-LLM][ERROR] the current process is not the leader or orchestrator"
            )

    def enqueue_request(self, request: Request) -> int:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        if not isinstance(requests, list) or not all(isinstance(r, Request) for r in requests):
            raise TypeError("requests must be a list of Request")
        self._check_usable("Shutdown called, cannot enqueue requests")
        with self._lock:
            ids = []
            for r in requests:
                rid = next(self._ids)
                live = _Live(rid, r)
                # insertRequestInOrder: after every waiting request of the same or higher
                # priority.
                at = len(self._waiting)
                for i, w in enumerate(self._waiting):
                    if w.request.priority < r.priority:
                        at = i
                        break
                self._waiting.insert(at, live)
                self._all[rid] = live
                ids.append(rid)
                TEST_DOUBLE.requests.append(r)
            self._lock.notify_all()
            return ids

    def _fetch_error(self, r: Request) -> str | None:
        """fetchNewRequests / LlmRequest::validate: what fails a request as it is scheduled."""
        n = len(r.input_token_ids)
        if r.end_id is not None and not -1 <= r.end_id < self.vocab_size:
            why = f"EndId ({r.end_id}) is not within acceptable range [-1, {self.vocab_size})."
        elif r.output_config.return_context_logits and not self.gather_context_logits:
            why = "Return context logit need to build engine with gather_context_logits"
        elif n > self.max_input_len:
            why = f"Prompt length ({n}) exceeds maximum input length ({self.max_input_len})."
        elif (
            r.streaming
            and not self.guaranteed_no_evict
            and not self.chunked_context
            and n + r.max_tokens - 1 > self.max_input_len
        ):
            why = (
                "Request sequence length is potentially greater than max input length. This "
                "cannot be run unless streaming is disabled, context chunking is enabled or the "
                "GUARANTEED_NO_EVICT scheduling policy is used"
            )
        else:
            return None
        return f"Encountered an error when fetching new request: [TensorRT-LLM][ERROR] {why}"

    def cancel_request(self, id: int) -> None:  # the real keyword is `id`
        self._check_usable("Shutdown called")
        with self._lock:
            live = self._all.get(id)
            if live is not None:
                live.cancelled = True
                self._lock.notify_all()

    def get_num_responses_ready(self, id: int | None = None) -> int:
        self._check_usable("Shutdown called")
        with self._lock:
            if id is None:
                return len(self._ready)
            return sum(1 for r in self._ready if r.request_id == id)

    def await_responses(self, *args, **kwargs) -> list[Response]:
        """The three real overloads: (timeout=None), (id, timeout=None), (ids, timeout=None)."""
        target, timeout = _await_args(args, kwargs)
        self._check_usable("Shutdown called")
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._lock:
            while True:
                picked = self._take(target)
                if picked or self._stopped:
                    return picked
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._lock.wait(remaining)

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        self._check_usable("Shutdown called")
        with self._lock:
            out = list(self._stats)
            self._stats.clear()
            return out

    def get_latest_request_stats(self) -> list:
        return []

    def shutdown(self) -> None:
        if self._shutdown_called:  # "Cannot call shutdown multiple times": returns
            return
        self._shutdown_called = True
        self.shutdown_called = True
        self._stop_thread()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- the simulation ---------------------------------------------------------------------

    def _stop_thread(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _take(self, target: object) -> list[Response]:
        if target is None:
            picked, self._ready = self._ready, []
            return picked
        ids = {target} if isinstance(target, int) else set(target)
        picked = [r for r in self._ready if r.request_id in ids]
        self._ready = [r for r in self._ready if r.request_id not in ids]
        return picked

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting and not self._active:
                    self._lock.wait(0.05)
                if self._stopped:
                    return
                started = time.monotonic()
                self._step()
                self._record_stats((time.monotonic() - started) * 1000)
                self._lock.notify_all()
            time.sleep(TEST_DOUBLE.iteration_ms / 1000.0)

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)

    def _used_blocks(self) -> int:
        return sum(x.blocks for x in self._active.values())

    def _step(self) -> None:
        # Cancelled requests end first, whether running or still queued.
        for live in [x for x in self._waiting if x.cancelled]:
            self._waiting.remove(live)
            self._finish(live, FinishReason.CANCELLED, [])
        for live in [x for x in self._active.values() if x.cancelled]:
            self._finish(live, FinishReason.CANCELLED, [])
        # Admit FIFO while the batch and the KV cache have room (GUARANTEED_NO_EVICT reserves
        # the whole sequence up front).
        while self._waiting and len(self._active) < self.max_batch_size:
            live = self._waiting[0]
            r = live.request
            need = self._blocks_for(min(len(r.input_token_ids) + r.max_tokens, self.max_seq_len))
            if self._used_blocks() + need > self.max_num_blocks:
                break
            self._waiting.popleft()
            error = self._fetch_error(r)
            if error is not None:
                self._all.pop(live.rid, None)
                self._ready.append(Response(live.rid, error, r.client_id))
                continue
            live.blocks = need
            self._active[live.rid] = live
        self._iter += 1
        for live in list(self._active.values()):
            self._advance(live)

    def _advance(self, live: _Live) -> None:
        r = live.request
        step = len(live.generated)
        fail_step = TEST_DOUBLE.fail_at.get(r.input_token_ids[0])
        if fail_step is not None and step >= fail_step:
            del self._active[live.rid]
            self._all.pop(live.rid, None)
            self._ready.append(Response(live.rid, TEST_DOUBLE.fail_message, r.client_id))
            return
        time_out_step = TEST_DOUBLE.time_out_at.get(r.input_token_ids[0])
        if time_out_step is not None and step >= time_out_step:
            self._finish(live, FinishReason.TIMED_OUT, [])
            return
        token = self._token(r, step)
        # max_tokens is clamped to what the sequence length leaves (the real executor warns).
        max_tokens = min(r.max_tokens, self.max_seq_len - len(r.input_token_ids))
        if r.end_id is not None and r.end_id >= 0 and token == r.end_id:
            self._finish(live, FinishReason.END_ID, [])  # the end token is not returned
            return
        live.generated.append(token)
        if any(live.generated[-len(w) :] == w for w in r.stop_words if w):
            self._finish(live, FinishReason.STOP_WORDS, [token])
        elif len(live.generated) >= max_tokens:
            self._finish(live, FinishReason.LENGTH, [token])
        elif r.streaming:
            self._respond(live, [token], FinishReason.NOT_FINISHED, final=False)

    def _token(self, r: Request, step: int) -> int:
        if TEST_DOUBLE.token_fn is not None:
            return int(TEST_DOUBLE.token_fn(list(r.input_token_ids), step))
        low = min(100, self.vocab_size // 4)
        span = self.vocab_size - low
        token = low + (sum(r.input_token_ids) * 31 + step * 7919 + 17) % span
        if r.end_id is not None and token == r.end_id:
            token = low + (token - low + 1) % span
        return token

    def _finish(self, live: _Live, reason: FinishReason, new: list[int]) -> None:
        self._active.pop(live.rid, None)
        self._all.pop(live.rid, None)
        if live.request.streaming:
            self._respond(live, new, reason, final=True)
        else:
            self._respond(live, list(live.generated), reason, final=True)

    def _respond(self, live: _Live, tokens: list[int], reason: FinishReason, final: bool) -> None:
        res = Result()
        res.is_final = final
        res.is_sequence_final = final
        res.output_token_ids = [list(tokens)]
        res.finish_reasons = [reason]
        if TEST_DOUBLE.legacy_results:
            del res.finish_reasons
        res.decoding_iter = self._iter
        if live.request.output_config.return_context_logits:
            prompt = live.request.input_token_ids
            if len(prompt) not in TEST_DOUBLE.no_context_logits_for:
                res.context_logits = double_context_logits(prompt, self.vocab_size)
        if live.request.output_config.return_perf_metrics:
            res.request_perf_metrics = RequestPerfMetrics()
            reused = TEST_DOUBLE.reused_blocks.get(live.request.input_token_ids[0], 0)
            res.request_perf_metrics.kv_cache_metrics.num_reused_blocks = reused
        if live.request.output_config.return_log_probs:
            # Cumulative: one per token generated so far (result.py, see the docstring).
            left_out = TEST_DOUBLE.short_log_probs.get(live.request.input_token_ids[0], 0)
            kept = max(len(live.generated) - left_out, 0)
            res.log_probs = [[_logprob(i) for i in range(kept)]]
            res.cum_log_probs = [sum(res.log_probs[0])]
        self._ready.append(Response(live.rid, res, live.request.client_id))

    def _record_stats(self, latency_ms: float) -> None:
        s = IterationStats()
        s.timestamp = datetime.datetime.now().isoformat()
        s.iter = self._iter
        s.iter_latency_ms = latency_ms
        s.num_active_requests = len(self._active)
        s.num_queued_requests = len(self._waiting)
        s.max_num_active_requests = self.max_batch_size
        kv = KvCacheStats()
        kv.max_num_blocks = self.max_num_blocks
        kv.used_num_blocks = self._used_blocks()
        kv.free_num_blocks = self.max_num_blocks - kv.used_num_blocks
        kv.tokens_per_block = self.tokens_per_block
        s.kv_cache_stats = kv
        ifb = InflightBatchingStats()
        ifb.num_scheduled_requests = len(self._active)
        ifb.num_gen_requests = len(self._active)
        ifb.num_paused_requests = TEST_DOUBLE.paused_requests
        s.inflight_batching_stats = ifb
        self._stats.append(s)


# ---------------------------------------------------------------------------------------------


def double_context_logits(prompt: list[int], vocab_size: int):
    """The double's context logits (no model: a fixed pattern), [len(prompt), vocab_size] float32:
    row i depends on prompt token i, as a model's logits at position i depend on the tokens up to
    it. Test-only, not a TensorRT-LLM name."""
    import torch  # in every TensorRT-LLM environment

    rows = torch.tensor(prompt, dtype=torch.float32).unsqueeze(1)
    cols = torch.arange(vocab_size, dtype=torch.float32).unsqueeze(0)
    return torch.remainder(rows * 13 + cols * 7, 23) / 4


def _logprob(position: int) -> float:
    """The double's log probability of the token at a position (no model: a fixed pattern)."""
    return -0.25 - 0.01 * (position % 7)


def _check_enum(name: str, value: object, kind: type[enum.Enum]) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")


def _int32(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if not -(2**31) <= value < 2**31:
        raise TypeError(f"{name}: {value} does not fit a 32-bit integer")
    return value


def _word_list(name: str, words: list[list[int]] | None) -> list[list[int]]:
    if words is None:
        return []
    return [[_int32(name, t) for t in w] for w in words]


def _await_args(args: tuple, kwargs: dict) -> tuple[object, datetime.timedelta | None]:
    target: object = None
    timeout = kwargs.pop("timeout", None)
    if "id" in kwargs:
        target = kwargs.pop("id")
    elif "ids" in kwargs:
        target = kwargs.pop("ids")
    if kwargs:
        raise TypeError(f"await_responses: unexpected arguments {sorted(kwargs)}")
    if args:
        first = args[0]
        if isinstance(first, int | list):
            target = first
            if len(args) > 1:
                timeout = args[1]
        else:
            timeout = first
    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        # std::chrono::milliseconds is converted from datetime.timedelta.
        raise TypeError("await_responses: timeout must be a datetime.timedelta or None")
    return target, timeout
