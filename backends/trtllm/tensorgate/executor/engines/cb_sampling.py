"""Per-request sampling and log probabilities inside transformers' continuous batching.

transformers' CB either samples every row with one global RNG (`torch.multinomial`) or takes
the argmax of the whole batch, and the logprobs it can return are those of the final scores.
So neither a request's seed nor its own sampling settings survive sharing a batch. The manager
therefore runs in argmax mode, and one processor, the only one in its list, handles the rows
that need it (greedy rows that want no logprobs are not touched):

- sampled rows: temperature, top-k, top-p (the semantics of transformers' warpers, in that
  order), then Gumbel noise from a generator seeded by (request seed, step). The manager's
  argmax of logits / T + Gumbel is an exact sample of softmax(logits / T), and it is the same
  whatever else shares the batch;
- rows that asked for logprobs: the log-softmax of the distribution the token was drawn from
  (TGI's convention: after temperature/top-k/top-p; the raw model distribution when greedy), at
  the chosen token, and the top-n alternatives. They go to a `LogprobBook` keyed by (request,
  step), where the engine's consumer thread picks them up with the tokens.

Each row carries a ticket (an int32, the argument format of CB processors) that names what was
registered for it when the batch was prepared.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

NO_TICKET = -1


@dataclass(frozen=True, slots=True)
class RowSpec:
    """What one request asks of the processor; passed as a CB logit-processor kwarg."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    logprobs: bool = False
    top_n: int = 0


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for one step of one request."""
    return (seed * 1_000_003 + step * 7_919 + 1) & 0x7FFF_FFFF_FFFF_FFFF


class LogprobBook:
    """Logprobs computed in the CB thread, waiting for the consumer thread. Only tracked
    requests are recorded, so a cancelled request leaves nothing behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_request: dict[str, dict[int, TokenLogprobs]] = {}

    def track(self, request_id: str) -> None:
        with self._lock:
            self._by_request[request_id] = {}

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._by_request.pop(request_id, None)

    def put(self, request_id: str, step: int, value: TokenLogprobs) -> None:
        with self._lock:
            steps = self._by_request.get(request_id)
            if steps is not None:
                steps[step] = value

    def take(self, request_id: str, first_step: int, count: int) -> list[TokenLogprobs | None]:
        with self._lock:
            steps = self._by_request.get(request_id, {})
            return [steps.pop(s, None) for s in range(first_step, first_step + count)]


def _generated_before(state) -> int:
    """How many tokens the request has generated before this step. A preempted request is
    re-queued with its tokens folded into the prompt, so those count too."""
    true_prompt = state._true_initial_tokens
    folded = len(state.initial_tokens) - true_prompt if true_prompt else 0
    return state.generated_len() + folded


def _top_k_(row: torch.Tensor, k: int) -> None:
    threshold = torch.topk(row, k).values[-1]
    row.masked_fill_(row < threshold, -math.inf)


def _top_p_(row: torch.Tensor, p: float) -> None:
    # As transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - p, keep the top.
    sorted_logits, sorted_idx = torch.sort(row, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    remove[-1] = False
    row[sorted_idx[remove]] = -math.inf


class PerRequestSampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {"row_spec": RowSpec}  # noqa: RUF012 - transformers' API
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, book: LogprobBook) -> None:
        self.book = book
        self._tickets = itertools.count()
        # Tickets of the batch being prepared and of the one before: with async batching one
        # batch is prepared ahead of the one computed; older entries are stale and dropped.
        self._current: dict[int, tuple[str, int, RowSpec]] = {}
        self._previous: dict[int, tuple[str, int, RowSpec]] = {}

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_TICKET)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        self._previous, self._current = self._current, {}
        tickets = []
        for request in requests_with_new_token:
            state = request.state
            spec = state.logit_processor_kwargs.get("row_spec")
            if spec is None:
                tickets.append(NO_TICKET)
                continue
            ticket = next(self._tickets) & 0x7FFF_FFFF
            self._current[ticket] = (state.request_id, _generated_before(state), spec)
            tickets.append(ticket)
        return torch.tensor(tickets, dtype=torch.int32, device="cpu")

    def _claim(self, ticket: int) -> tuple[str, int, RowSpec] | None:
        row = self._current.pop(ticket, None)
        return row if row is not None else self._previous.pop(ticket, None)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self._current and not self._previous:
            # No row of this batch registered anything (all plain greedy): reading the tickets
            # back would cost a device-to-host copy, a sync of the accelerator every step.
            return scores
        rows: list[tuple[int, str, int, RowSpec]] = []
        for i, ticket in enumerate(tensor_arg[: scores.size(0)].tolist()):
            if ticket != NO_TICKET:
                claimed = self._claim(ticket)
                if claimed is not None:
                    rows.append((i, *claimed))
        if not rows:
            return scores
        device = scores.device
        vocab = scores.size(1)
        specs = [r[3] for r in rows]
        index = torch.tensor([r[0] for r in rows], device=device)
        sub = scores.index_select(0, index).float()
        temps = [s.temperature if s.do_sample else 1.0 for s in specs]
        if any(t != 1.0 for t in temps):
            sub /= torch.tensor(temps, device=device, dtype=sub.dtype).unsqueeze(1)
        for j, s in enumerate(specs):
            if s.do_sample and 0 < s.top_k < vocab:
                _top_k_(sub[j], s.top_k)
            if s.do_sample and 0.0 < s.top_p < 1.0:
                _top_p_(sub[j], s.top_p)
        want_logprobs = any(s.logprobs or s.top_n for s in specs)
        logprobs = torch.log_softmax(sub, dim=-1) if want_logprobs else None
        sampled = [j for j, s in enumerate(specs) if s.do_sample]
        if sampled:
            generator = torch.Generator(device=device)
            tiny = torch.finfo(torch.float32).tiny
            for j in sampled:
                _, _, step, s = rows[j]
                generator.manual_seed(step_seed(s.seed, step))
                u = torch.rand(vocab, generator=generator, device=device).clamp_(min=tiny)
                sub[j] -= torch.log(-torch.log(u))
        if logprobs is not None:
            self._record(rows, specs, sub, logprobs)
        if not sampled:
            return scores  # greedy rows only: the manager's argmax of the raw scores stands
        picked = torch.tensor(sampled, device=device)
        return scores.index_copy(0, index[picked], sub[picked].to(scores.dtype))

    def _record(self, rows, specs, final: torch.Tensor, logprobs: torch.Tensor) -> None:
        # The manager takes the argmax of the rows as returned, so this is its choice.
        chosen = final.argmax(dim=-1, keepdim=True)
        chosen_lp = logprobs.gather(1, chosen).squeeze(1).tolist()
        max_n = max(s.top_n for s in specs)
        top_lp: list[list[float]] = []
        top_ids: list[list[int]] = []
        if max_n:
            values, ids = torch.topk(logprobs, max_n, dim=-1)
            top_lp, top_ids = values.tolist(), ids.tolist()
        for j, (_, request_id, step, s) in enumerate(rows):
            if not (s.logprobs or s.top_n):
                continue
            ids_j: list[int] = []
            lps_j: list[float] = []
            for n in range(s.top_n):
                if top_lp[j][n] == -math.inf:
                    break  # filtered out by top-k/top-p: not an alternative
                ids_j.append(top_ids[j][n])
                lps_j.append(top_lp[j][n])
            self.book.put(request_id, step, TokenLogprobs(chosen_lp[j], ids_j, lps_j))


def build_processor_list(book: LogprobBook) -> ContinuousBatchingLogitsProcessorList:
    """The manager's processor list, with our sampler as its only processor."""
    plist = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
    plist.logits_processor = LogitsProcessorList([PerRequestSampler(book)])
    plist.tensors_required = 1
    plist._retrieve_processors_kwargs()
    plist.do_processing = True
    return plist


def row_spec(sampling, return_logprobs: bool, top_n: int) -> RowSpec | None:
    """The RowSpec of a wire request, or None when the row needs nothing (plain greedy)."""
    if not sampling.do_sample and not return_logprobs and not top_n:
        return None
    if not sampling.do_sample:
        return RowSpec(logprobs=return_logprobs, top_n=top_n)
    return RowSpec(
        do_sample=True,
        temperature=float(sampling.temperature) if sampling.temperature > 0 else 1.0,
        top_k=int(sampling.top_k),
        top_p=float(sampling.top_p) if 0.0 < sampling.top_p < 1.0 else 1.0,
        # Unseeded requests still differ from one another.
        seed=int(sampling.seed) if sampling.HasField("seed") else random.getrandbits(63),
        logprobs=return_logprobs,
        top_n=top_n,
    )
