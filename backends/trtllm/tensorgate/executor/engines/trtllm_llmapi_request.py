"""One tensorgate request as TensorRT-LLM's LLM API takes it, and its results read back.

`tensorrt_llm.SamplingParams` (`tensorrt_llm/sampling_params.py`) carries everything per
request; the result of `LLM.generate_async(..., streaming=True)` (`tensorrt_llm/executor/
result.py`) grows with every step: `outputs[0].token_ids` and `.logprobs` hold everything so
far, so the new part of each is what lies past what was already read.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorgate.executor.engines.trtllm_engine import SEEDED_RESUME
from tensorgate.v1 import executor_pb2 as pb

# GuidedDecodingParams fields per grammar kind (sampling_params.py). Lark is llguidance's
# grammar syntax; xgrammar's `grammar` is EBNF, so Lark goes only to llguidance.
_GUIDE_FIELD = {"json_schema": "json", "regex": "regex", "lark": "grammar"}


class RequestMappingError(ValueError):
    """A request TensorRT-LLM cannot run as asked; the message is for the client."""


@dataclass
class LiveRequest:
    """A request in flight: what ends it, what it asked for, and how much of its growing
    result has been read."""

    rid: int
    eos: frozenset[int]
    stop: frozenset[int]
    logprobs: bool
    result: object | None = None
    tokens_read: int = 0
    logprobs_read: int = 0
    prompt: list[int] | None = None  # the prompt, until its log probabilities have been sent
    prompt_len: int = 0
    first: bool = True  # its first output (which carries cached_tokens) is to come


def grammar_of(req: pb.GenerateRequest) -> tuple[str, str] | None:
    """(kind, text) of the request's grammar, None without one (or on a contract without the
    field)."""
    if "grammar" not in pb.GenerateRequest.DESCRIPTOR.fields_by_name:
        return None
    if not req.HasField("grammar"):
        return None
    g = req.grammar
    kind = pb.GrammarKind.Name(g.kind).removeprefix("GRAMMAR_KIND_").lower()
    return kind, g.value


def _has(req: pb.GenerateRequest, name: str) -> bool:
    return name in pb.GenerateRequest.DESCRIPTOR.fields_by_name


def sampling_kwargs(
    req: pb.GenerateRequest,
    eos_ids: list[int],
    guided_backend: str,
    vocab_size: int,
) -> dict[str, object]:
    """The SamplingParams keywords for `req`; RequestMappingError for what cannot be run."""
    s = req.sampling
    kw: dict[str, object] = {"max_tokens": req.max_new_tokens, "detokenize": False}
    if s.do_sample:
        # Without top_k and top_p, SamplingParams counts as greedy (`_greedy_decoding`:
        # top_k None or 1 and top_p None or 0): top_p=1.0 keeps full-distribution sampling.
        kw["temperature"] = s.temperature if s.temperature > 0 else 1.0
        kw["top_p"] = s.top_p if 0.0 < s.top_p <= 1.0 else 1.0
        if s.top_k > 0:
            kw["top_k"] = s.top_k
        if s.HasField("seed"):
            if req.resumed_tokens:
                # SamplingParams(seed=) becomes SamplingConfig(seed=): seeded once, at the
                # request's first step (trtllm_engine.SEEDED_RESUME). Greedy and unseeded
                # requests resume as they are; penalties already count the whole input.
                raise RequestMappingError(SEEDED_RESUME)
            kw["seed"] = s.seed
    else:
        kw["top_k"] = 1
    if s.do_sample and 0.0 < s.typical_p < 1.0:
        raise RequestMappingError("typical_p is not supported by TensorRT-LLM's SamplingParams")
    if s.repetition_penalty and s.repetition_penalty != 1.0:
        kw["repetition_penalty"] = s.repetition_penalty
    if s.frequency_penalty:
        kw["frequency_penalty"] = s.frequency_penalty
    if s.presence_penalty:
        kw["presence_penalty"] = s.presence_penalty
    if req.top_n_tokens:
        raise RequestMappingError("top_n_tokens is not supported by this engine")
    if req.return_logprobs:
        kw["logprobs"] = 1  # the chosen token's own, one per position
    if _has(req, "return_prompt_logprobs") and req.return_prompt_logprobs:
        # The prompt's logits, from which the engine computes each prompt token's log
        # probability (prompt_logprobs.py). Not SamplingParams(prompt_logprobs=k): TensorRT-LLM
        # answers that with the top k of each position only (executor/result.py compute_logprobs
        # passes no tokens for the prompt), so a prompt token outside the top k has none.
        kw["return_context_logits"] = True
    # The first eos id is end_id; ignore_eos makes TensorRT-LLM send end_id -1
    # (tensorrt_llm/executor/base_worker.py `_enqueue_request`). Other eos ids and the stop ids
    # are stop token ids, kept in the output (include_stop_str_in_output) as the other engines
    # report them.
    kw["end_id"] = eos_ids[0] if eos_ids else -1
    kw["pad_id"] = kw["end_id"]
    kw["ignore_eos"] = bool(req.ignore_eos)
    stops = set(req.stop_token_ids)
    if not req.ignore_eos:
        stops |= set(eos_ids[1:])
    if stops:
        kw["stop_token_ids"] = sorted(stops)
        kw["include_stop_str_in_output"] = True
    if _has(req, "min_new_tokens") and req.min_new_tokens:
        kw["min_tokens"] = req.min_new_tokens
    if _has(req, "logit_bias") and len(req.logit_bias):
        kw["embedding_bias"] = _embedding_bias(dict(req.logit_bias), vocab_size)
    grammar = grammar_of(req)
    if grammar is not None:
        kw["guided_decoding"] = _guide(grammar, guided_backend)
    return kw


def _embedding_bias(bias: dict[int, float], vocab_size: int):
    """SamplingParams(embedding_bias=): "kFP32 and shape is [vocab_size]" (sampling_params.py)."""
    import torch  # in every TensorRT-LLM environment; only needed when a request asks for bias

    t = torch.zeros(vocab_size, dtype=torch.float32)
    for token, value in bias.items():
        if not 0 <= token < vocab_size:
            raise RequestMappingError(
                f"logit_bias names token {token}, outside the vocabulary of {vocab_size}"
            )
        t[token] = value
    return t


def _guide(grammar: tuple[str, str], backend: str) -> tuple[str, str]:
    """The GuidedDecodingParams field and its text; the caller builds the object."""
    kind, text = grammar
    if backend == "none":
        raise RequestMappingError(
            "a grammar needs the executor's --guided-decoding-backend (xgrammar or llguidance)"
        )
    field = _GUIDE_FIELD.get(kind)
    if field is None or (kind == "lark" and backend != "llguidance"):
        raise RequestMappingError(
            f"a {kind} grammar is not supported by TensorRT-LLM's {backend} backend"
        )
    return field, text


def new_logprobs(logprobs: list, tokens: list[int], start: int) -> list[float] | None:
    """The log probabilities of `tokens`, which start at position `start` of the output; None
    when the result does not carry one for each (nothing is invented in its place). An entry is
    a `{token_id: Logprob}` dict (LogprobResults) or, on the TensorRT backend, a float."""
    values: list[float] = []
    for i, token in enumerate(tokens):
        pos = start + i
        if pos >= len(logprobs):
            return None
        entry = logprobs[pos]
        if isinstance(entry, dict):
            lp = entry.get(token)
            if lp is None:
                return None
            values.append(float(getattr(lp, "logprob", lp)))
        else:
            values.append(float(entry))
    return values


def finish_reason(output, live: LiveRequest) -> tuple[int, str]:
    """The contract's finish reason for a finished CompletionOutput (result.py:
    'stop' | 'length' | 'timeout' | 'cancelled'), and an error message for an error end."""
    reason = output.finish_reason
    if reason == "length":
        return pb.FINISH_REASON_LENGTH, ""
    if reason == "cancelled":
        return pb.FINISH_REASON_CANCELLED, ""
    if reason == "stop":
        stop = output.stop_reason
        if stop is None or stop in live.eos:
            return pb.FINISH_REASON_EOS_TOKEN, ""  # END_ID, or another eos id
        return pb.FINISH_REASON_STOP_TOKEN, ""
    if reason == "timeout":
        return pb.FINISH_REASON_ERROR, "TensorRT-LLM timed the request out"
    return pb.FINISH_REASON_ERROR, f"TensorRT-LLM ended the request with {reason!r}"
