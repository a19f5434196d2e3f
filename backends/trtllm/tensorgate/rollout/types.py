"""What the rollout client takes and gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one generation request (TGI `parameters`).

    `temperature=0` means greedy (the `do_sample: false` of TGI). The log probabilities the
    server returns are those of the distribution the token was drawn from, after temperature,
    top-k and top-p (TGI's convention), the raw model distribution when greedy: a trainer that
    recomputes them must apply the same temperature to its logits.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise ValueError("temperature=0 is greedy: top_p and top_k must be unset")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_tgi(self, seed: int | None) -> dict[str, Any]:
        """TGI's `parameters`, with `details` on (it carries the token ids and logprobs)."""
        p: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "details": True}
        if self.greedy:
            p["do_sample"] = False
        else:
            p["do_sample"] = True
            if self.temperature != 1.0:
                p["temperature"] = self.temperature
            if self.top_p is not None:
                p["top_p"] = self.top_p
            if self.top_k is not None:
                p["top_k"] = self.top_k
            if seed is not None:
                p["seed"] = seed
        if self.stop_token_ids:
            p["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            p["ignore_eos"] = True
        if self.min_new_tokens:
            p["min_new_tokens"] = self.min_new_tokens
        return p


@dataclass(frozen=True)
class Sample:
    """One generated sequence: the exact sampled ids and their log probabilities."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    # The label of the weights that produced the last token (None from a server that does
    # not report it).
    weight_version: str | None
    # The router's `x-request-id` (what /abort_request takes).
    request_id: str | None
    seed: int | None


@dataclass(frozen=True)
class ControlResult:
    """A control route's answer: `{"success", "message", "weight_version", ...}`; `raw` keeps
    the route-specific fields (e.g. memory_delta_bytes, released_memory_tags)."""

    success: bool
    message: str
    weight_version: str | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, body: Any) -> ControlResult:
        if not isinstance(body, dict):
            body = {}
        version = body.get("weight_version")
        return cls(
            success=bool(body.get("success", True)),
            message=str(body.get("message", "")),
            weight_version=str(version) if version is not None else None,
            raw=body,
        )


@dataclass(frozen=True)
class UpdateResult:
    """What update_weights_from_state_dict did: requests sent, tensors and bytes pushed, and
    the server's answer to the last request."""

    requests: int
    tensors: int
    bytes: int
    seconds: float
    weight_version: str | None
    last: ControlResult
