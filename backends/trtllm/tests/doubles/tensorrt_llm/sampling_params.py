"""!!! TEST DOUBLE — NOT TensorRT-LLM !!! `tensorrt_llm.sampling_params`: the fields tensorgate
sets, with the validation TensorRT-LLM does in `SamplingParams.__post_init__` / `_validate` and
`GuidedDecodingParams._validate` (`tensorrt_llm/sampling_params.py`, commit 000a01de66f0)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    json: object | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        # "Only one guide can be used for a request" (GuidedDecodingParams._validate).
        n = sum(bool(getattr(self, f.name)) for f in fields(self))
        if n > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {n}.")


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    embedding_bias: object | None = None
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    return_context_logits: bool = False
    guided_decoding: GuidedDecodingParams | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    # Every result then carries the request's RequestPerfMetrics (executor/result.py).
    return_perf_metrics: bool = False

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        self._validate()

    @property
    def _greedy_decoding(self) -> bool:
        return (
            not self.use_beam_search
            and (self.top_k is None or self.top_k == 1)
            and (self.top_p is None or self.top_p == 0.0)
        )

    def _validate(self) -> None:
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if self.best_of > 1 and self._greedy_decoding:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()
        # "users might pass in logprob=True for Top-1 logprobs"
        self.logprobs = self.logprobs and int(self.logprobs)

    def _get_stop_reasons_and_words(self) -> list[tuple[int, list[int]]]:
        return [(i, [i]) for i in self.stop_token_ids or []]
