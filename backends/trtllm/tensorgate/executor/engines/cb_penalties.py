"""Per-row logit adjustments of the transformers engine's sampler, each with the semantics of the
API that named it, applied to one request's row of logits in place:

- repetition penalty (Hugging Face `RepetitionPenaltyLogitsProcessor`): every token already in
  the prompt or the output has its logit divided by the penalty when positive, multiplied when
  negative;
- frequency and presence penalties (OpenAI): `logit -= count * frequency + (count > 0) *
  presence`, counting the generated tokens only;
- logit bias (OpenAI): added to the logit;
- typical sampling (Hugging Face `TypicalLogitsWarper`), a warper like top-p.

`TokenHistory` keeps what the penalties need about one request, as tensors on the logits' device
so that a step costs two indexed writes rather than a rebuild from the token list.
"""

from __future__ import annotations

import math

import torch


class TokenHistory:
    """The tokens one request has seen: `seen` (prompt + generated, for the repetition penalty)
    and `counts` (generated only, for the frequency and presence penalties). Built on the first
    step, from the input, on the device and with the vocabulary of the logits. The last
    `resumed` input tokens were generated for the request by an executor it migrated from: they
    are counted as generated."""

    __slots__ = ("counts", "seen")

    def __init__(
        self, prompt: list[int], vocab: int, device: torch.device, resumed: int = 0
    ) -> None:
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if prompt:
            ids = torch.tensor(prompt, dtype=torch.long, device=device)
            self.seen[ids[ids < vocab]] = True
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if resumed:
            ids = torch.tensor(prompt[len(prompt) - resumed :], dtype=torch.long, device=device)
            ids = ids[ids < vocab]
            self.counts.index_add_(0, ids, torch.ones(len(ids), device=device))

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1.0


def repetition_penalty_(row: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    penalized = torch.where(row < 0, row * penalty, row / penalty)
    torch.where(seen, penalized, row, out=row)


def frequency_presence_(
    row: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> None:
    if frequency:
        row.sub_(counts * frequency)
    if presence:
        row.sub_((counts > 0).to(row.dtype) * presence)


def logit_bias_(row: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    row.index_add_(0, ids, values)


def typical_(row: torch.Tensor, mass: float) -> None:
    """As transformers' TypicalLogitsWarper (min_tokens_to_keep=1): keep the tokens whose
    surprise is closest to the entropy until their mass reaches `mass`."""
    logp = torch.log_softmax(row, dim=-1)
    entropy = -(logp * logp.exp()).nansum()
    shifted = (-logp - entropy).abs()
    sorted_shift, order = torch.sort(shifted)
    cumulative = row.gather(0, order).softmax(dim=-1).cumsum(dim=-1)
    last = min(int((cumulative < mass).sum()), row.numel() - 1)
    remove_sorted = sorted_shift > sorted_shift[last]
    remove_sorted[0] = False
    remove = torch.empty_like(remove_sorted).scatter_(0, order, remove_sorted)
    row.masked_fill_(remove, -math.inf)
