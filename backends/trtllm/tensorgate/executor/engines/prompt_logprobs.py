"""Prompt log probabilities (GenerateRequest.return_prompt_logprobs): what the model gave each
prompt token after the first, from the tokens before it, and the top-n alternatives there.

The value at prompt position i (i >= 1) is log_softmax(logits[i - 1])[token i] over the model's raw
logits: no temperature, penalty or other warper (TGI's prefill and vLLM's prompt_logprobs are raw
too). `from_logits` does the arithmetic for any engine that has the prompt's logits (the trtllm
flavours read them from TensorRT-LLM's context logits); `PromptScorer` gets them for the
transformers engine with a forward pass of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

log = logging.getLogger("tensorgate.executor.prompt_logprobs")

# Rows of logits turned into float32 log-probabilities at a time: bounds the extra memory to
# ROWS x vocab floats whatever the prompt's length (the logits themselves stay in their dtype).
ROWS = 256


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """One entry per prompt token after the first; `top_*` empty unless alternatives were asked."""

    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def add_to(self, out, top_n: int) -> None:
        """Into a RequestOutput: prompt_logprobs, and prompt_top_tokens when top_n > 0."""
        out.prompt_logprobs.extend(self.logprobs)
        if top_n:
            for ids, lps in zip(self.top_ids, self.top_logprobs, strict=True):
                out.prompt_top_tokens.add(ids=ids, logprobs=lps)


def from_logits(
    logits: torch.Tensor,
    prompt: list[int],
    top_n: int,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> PromptLogprobs:
    """`logits`: [positions, vocab] (or [1, positions, vocab]) with a row for at least every prompt
    position but the last; row i is the distribution of token i + 1. Columns past `vocab_size` (a
    vocabulary padded for tensor parallelism) are dropped; `device`: where the arithmetic runs
    (default: where the logits are). ValueError when rows are missing."""
    n = len(prompt)
    if n < 2:
        return PromptLogprobs([], [], [])
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"the engine returned no prompt logits (got {type(logits).__name__})")
    if logits.dim() == 3:
        logits = logits.squeeze(0)
    if logits.dim() != 2 or logits.size(0) < n - 1:
        raise ValueError(
            f"the engine returned prompt logits of shape {tuple(logits.shape)} for a prompt of "
            f"{n} tokens (needs at least {n - 1} rows)"
        )
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    if max(prompt) >= logits.size(1):
        raise ValueError(f"prompt token {max(prompt)} is outside the {logits.size(1)} logits")
    device = torch.device(device) if device is not None else logits.device
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=device)
    chosen: list[float] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for start in range(0, n - 1, ROWS):
        stop = min(start + ROWS, n - 1)
        lsm = torch.log_softmax(logits[start:stop].to(device, torch.float32), dim=-1)
        chosen.extend(lsm.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1).tolist())
        if top_n:
            values, ids = torch.topk(lsm, top_n, dim=-1)
            top_lps.extend(values.tolist())
            top_ids.extend(ids.tolist())
    return PromptLogprobs(chosen, top_ids, top_lps)


@torch.no_grad()
def score_prompt(model, prompt: list[int], top_n: int) -> PromptLogprobs:
    """One forward pass of the prompt through `model` (a transformers causal LM), no KV cache."""
    if len(prompt) < 2:
        return PromptLogprobs([], [], [])
    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    # Continuous batching sets the model to a paged kernel ("paged|sdpa"), which transformers
    # before 5.2x refuses outside a paged cache; this pass is a standard causal forward, run
    # between the manager's steps, so the unpaged kernel is swapped in for it alone.
    config = model.config
    impl = config._attn_implementation
    plain = impl.split("|", 1)[1] if isinstance(impl, str) and impl.startswith("paged|") else impl
    config._attn_implementation = plain
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        config._attn_implementation = impl
    return from_logits(logits[0, :-1], prompt, top_n)


class PromptScorer:
    """Prompt log probabilities for the transformers engine.

    transformers' continuous batching computes logits only where it samples (a prompt's last
    position, then each new token) and shares cached prefix blocks between requests, so a prompt's
    own logits never exist there. They come from one extra forward pass of the prompt
    (`score_prompt`), run in the CB manager's thread by our logits processor when it prepares the
    step that gives the request its first token (`PerRequestSampler.prepare_tensor_args`): between
    two steps, so it races neither the manager's own forward passes nor anything applied between
    steps, and the gRPC event loop never waits on it.

    Cost, paid only by requests that ask: the prefill compute of the prompt once more (no KV cache
    is kept), during which the step of every other running request waits; and, for that pass, a
    [prompt tokens, vocab] logits tensor in the model's dtype (e.g. 4095 x 49152 x 4 bytes, about
    800 MB, for the embedded model's longest prompt on CPU in float32).

    The engine registers a request before adding it to the manager and takes the result with its
    first output; a failed pass is kept as its message (the request then fails with it) and never
    raised into the manager's loop.
    """

    def __init__(self, model) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[list[int], int]] = {}
        self._done: dict[str, PromptLogprobs | str] = {}
        # Registered and not yet taken or forgotten: a result for anything else is dropped (a
        # request cancelled while its prompt was being scored leaves nothing behind).
        self._registered: set[str] = set()

    def register(self, request_id: str, prompt: list[int], top_n: int) -> None:
        with self._lock:
            self._pending[request_id] = (prompt, top_n)
            self._registered.add(request_id)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)
            self._done.pop(request_id, None)
            self._registered.discard(request_id)

    def has_pending(self) -> bool:
        # Read without the lock: a stale answer only delays a request by one step.
        return bool(self._pending)

    def score(self, request_ids: Iterable[str]) -> None:
        """In the manager's thread: scores the registered prompts among `request_ids`."""
        for rid in request_ids:
            with self._lock:
                job = self._pending.pop(rid, None)
            if job is None:
                continue
            prompt, top_n = job
            try:
                result: PromptLogprobs | str = score_prompt(self.model, prompt, top_n)
            except Exception as e:  # never into the manager's loop: the request fails instead
                log.warning("prompt log probabilities failed for request %s: %s", rid, e)
                result = f"the engine could not compute the prompt's log probabilities: {e}"
            with self._lock:
                if rid in self._registered:
                    self._done[rid] = result

    def take(self, request_id: str) -> PromptLogprobs | str | None:
        """The request's result (or the message of its failure); None when not computed."""
        with self._lock:
            result = self._done.pop(request_id, None)
            if result is not None:
                self._registered.discard(request_id)
            return result
