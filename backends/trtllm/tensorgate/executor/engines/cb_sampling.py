"""Per-request sampling and log probabilities inside transformers' continuous batching.

transformers' CB either samples every row with one global RNG (`torch.multinomial`) or takes
the argmax of the whole batch, and the logprobs it can return are those of the final scores.
So neither a request's seed nor its own sampling settings survive sharing a batch. The manager
therefore runs in argmax mode, and one processor, the only one in its list, handles the rows
that need it (greedy rows that want no logprobs are not touched):

- sampled rows: temperature, top-k, top-p (the semantics of transformers' warpers, in that
  order), then Gumbel noise from a generator seeded by (request seed, step), the step counting
  the tokens a migrated request generated on its previous executor. The manager's
  argmax of logits / T + Gumbel is an exact sample of softmax(logits / T), and it is the same
  whatever else shares the batch;
- rows that asked for logprobs: the log-softmax of the distribution the token was drawn from
  (TGI's convention: after temperature/top-k/top-p; the raw model distribution when greedy), at
  the chosen token, and the top-n alternatives. They go to a `LogprobBook` keyed by (request,
  step), where the engine's consumer thread picks them up with the tokens;
- before any of that, on the raw logits: repetition, frequency and presence penalties, logit
  bias (cb_penalties), the end ids masked until min_new_tokens, and the grammar's token mask
  (guided_decoding). These apply to greedy rows too, as in TGI and OpenAI.

The manager takes the argmax of the rows this returns (`ContinuousBatchingProcessor` runs with
`do_sample=False`; transformers' `model_runner._sample` is then `torch.argmax(scores)`), so the
processor knows each row's chosen token in the same call: it records it in the request's
`RowState` (penalty history, grammar matcher) right away. A request with any such state always
has a ticket, so its row is never skipped; the engine checks the recorded tokens against the
ones the manager reports. A grammar that completes, or a matcher that fails, ends the request
after this very token by lowering its token limit in the manager's request state.

Each row carries a ticket (an int32, the argument format of CB processors) that names what was
registered for it when the batch was prepared.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

from tensorgate.executor.engines import guided_timing
from tensorgate.executor.engines.cb_penalties import (
    TokenHistory,
    frequency_presence_,
    logit_bias_,
    repetition_penalty_,
    typical_,
)
from tensorgate.executor.engines.guided_decoding import GrammarBackend, apply_allowed_
from tensorgate.executor.engines.guided_timing import GuidedTiming
from tensorgate.executor.engines.prompt_logprobs import PromptScorer

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
    typical_p: float = 1.0  # 1.0: off; sampled rows only
    repetition_penalty: float = 1.0  # 1.0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_new_tokens: int = 0
    end_ids: tuple[int, ...] = ()  # the ids that would end the request (eos, stop_token_ids)
    # GenerateRequest.resumed_tokens: steps taken on the executor the request migrated from. It
    # offsets the seed's step only: min_new_tokens and the logprob book count steps taken here.
    resumed: int = 0

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


class RowState:
    """What a request's row carries from step to step, shared by the processor (which writes it
    in the manager's thread) and the engine (which reads it there, when the step's outputs are
    delivered): the tokens chosen, the penalty history, the grammar matcher, and how the
    processor ended the request, if it did."""

    __slots__ = ("bias", "done", "error", "generated", "history", "matcher", "prompt", "resumed")

    def __init__(self, prompt: list[int], matcher=None, resumed: int = 0) -> None:
        self.prompt = prompt
        self.resumed = resumed  # the prompt's last tokens that were generated elsewhere
        self.matcher = matcher
        self.generated: list[int] = []
        self.history: TokenHistory | None = None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        self.done = False  # the grammar is complete: the request ends with the last token
        self.error: str | None = None

    def __deepcopy__(self, memo) -> RowState:
        # transformers deep-copies a request's processor kwargs when it re-queues a preempted
        # request; the state belongs to the request, not to that copy (and a matcher cannot be
        # copied that way).
        return self


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


# One registered row of a batch: (request id, generated before this step, spec, state, the
# manager's request state).
_Row = tuple[str, int, RowSpec, "RowState | None", object]


class PerRequestSampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {"row_spec": RowSpec, "row_state": RowState}  # noqa: RUF012 - transformers' API
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(
        self,
        book: LogprobBook,
        grammar: GrammarBackend | None = None,
        timing: GuidedTiming | None = None,
        prompts: PromptScorer | None = None,
    ) -> None:
        self.book = book
        self.grammar = grammar
        self.timing = timing  # benchmark-only (guided_timing); None: nothing is timed
        self._masked_rows = 0  # rows the current call masked (read when timing)
        self.prompts = prompts
        self._tickets = itertools.count()
        # Tickets of the batch being prepared and of the one before: with async batching one
        # batch is prepared ahead of the one computed; older entries are stale and dropped.
        self._current: dict[int, _Row] = {}
        self._previous: dict[int, _Row] = {}

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_TICKET)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        if self.prompts is not None and self.prompts.has_pending():
            # Between two steps, in the manager's thread: the prompts of the requests about to get
            # their first token are scored now (see prompt_logprobs.PromptScorer for the cost).
            self.prompts.score(r.state.request_id for r in requests_with_new_token)
        self._previous, self._current = self._current, {}
        tickets = []
        for request in requests_with_new_token:
            state = request.state
            kwargs = state.logit_processor_kwargs
            spec = kwargs.get("row_spec")
            if spec is None:
                tickets.append(NO_TICKET)
                continue
            ticket = next(self._tickets) & 0x7FFF_FFFF
            row_state = kwargs.get("row_state")
            self._current[ticket] = (
                state.request_id, _generated_before(state), spec, row_state, state
            )  # fmt: skip
            tickets.append(ticket)
        return torch.tensor(tickets, dtype=torch.int32, device="cpu")

    def _claim(self, ticket: int) -> _Row | None:
        row = self._current.pop(ticket, None)
        return row if row is not None else self._previous.pop(ticket, None)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if self.timing is None:
            return self._process(scores, tensor_arg)
        # Benchmark-only: the whole call's time on steps that masked rows, from a settled device
        # (its own work, not the forward pass it would otherwise wait for) to its result.
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        t0 = time.perf_counter_ns()
        self._masked_rows = 0
        out = self._process(scores, tensor_arg)
        if self._masked_rows:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            self.timing.record_step("call", self._masked_rows, time.perf_counter_ns() - t0)
        return out

    def _process(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self._current and not self._previous:
            # No row of this batch registered anything (all plain greedy): reading the tickets
            # back would cost a device-to-host copy, a sync of the accelerator every step.
            return scores
        rows: list[tuple[int, str, int, RowSpec, RowState | None, object]] = []
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
        # Every row of the batch registered (a batch of constrained requests, say): the rows
        # are 0..n-1 in order, and one copy of the scores is all this call makes.
        whole = len(rows) == scores.size(0)
        index = None if whole else torch.tensor([r[0] for r in rows], device=device)
        if whole:
            sub = scores.clone() if scores.dtype == torch.float32 else scores.float()
        else:
            sub = scores.index_select(0, index).float()
        # Rows whose logits this call changes, to be copied back; the others (greedy rows that
        # only want logprobs) keep the raw scores, whose argmax is the manager's choice.
        changed = [self._adjust(sub[j], r, vocab) for j, r in enumerate(rows)]
        if self.grammar is not None:
            changed = self._mask_grammar(sub, rows, changed)
        temps = [s.temperature if s.do_sample else 1.0 for s in specs]
        if any(t != 1.0 for t in temps):
            sub /= torch.tensor(temps, device=device, dtype=sub.dtype).unsqueeze(1)
        for j, s in enumerate(specs):
            if s.do_sample and 0 < s.top_k < vocab:
                _top_k_(sub[j], s.top_k)
            if s.do_sample and 0.0 < s.top_p < 1.0:
                _top_p_(sub[j], s.top_p)
            if s.do_sample and 0.0 < s.typical_p < 1.0:
                typical_(sub[j], s.typical_p)
        want_logprobs = any(s.logprobs or s.top_n for s in specs)
        logprobs = torch.log_softmax(sub, dim=-1) if want_logprobs else None
        sampled = [j for j, s in enumerate(specs) if s.do_sample]
        if sampled:
            generator = torch.Generator(device=device)
            tiny = torch.finfo(torch.float32).tiny
            for j in sampled:
                step, s = rows[j][2], rows[j][3]
                generator.manual_seed(step_seed(s.seed, s.resumed + step))
                u = torch.rand(vocab, generator=generator, device=device).clamp_(min=tiny)
                sub[j] -= torch.log(-torch.log(u))
        if logprobs is not None:
            self._record(rows, specs, sub, logprobs)
        self._track(sub, rows)
        picked = [j for j, c in enumerate(changed) if c or specs[j].do_sample]
        if not picked:
            return scores  # greedy rows only: the manager's argmax of the raw scores stands
        if whole and len(picked) == len(rows):
            return sub.to(scores.dtype)
        if whole:
            index = torch.arange(len(rows), device=device)
        at = torch.tensor(picked, device=device)
        return scores.index_copy(0, index[at], sub[at].to(scores.dtype))

    @staticmethod
    def _adjust(row: torch.Tensor, r, vocab: int) -> bool:
        """Penalties, logit bias and the min_new_tokens mask, on one raw row, in place. True
        when the row was changed."""
        _, _, step, s, st, _ = r
        changed = False
        if st is not None and s.penalized:
            if st.history is None:
                st.history = TokenHistory(st.prompt, vocab, row.device, st.resumed)
            if s.repetition_penalty != 1.0:
                repetition_penalty_(row, st.history.seen, s.repetition_penalty)
            if s.frequency_penalty or s.presence_penalty:
                frequency_presence_(row, st.history.counts, s.frequency_penalty, s.presence_penalty)
            changed = True
        if s.logit_bias and st is not None:
            if st.bias is None:
                ids, values = zip(*s.logit_bias, strict=True)
                st.bias = (
                    torch.tensor(ids, dtype=torch.long, device=row.device),
                    torch.tensor(values, dtype=row.dtype, device=row.device),
                )
            logit_bias_(row, *st.bias)
            changed = True
        if step < s.min_new_tokens and s.end_ids:
            row[list(s.end_ids)] = -math.inf
            changed = True
        return changed

    def _mask_grammar(self, sub: torch.Tensor, rows, changed: list[bool]) -> list[bool]:
        assert self.grammar is not None
        t0 = time.perf_counter_ns() if self.timing is not None else 0
        self.grammar.wait()  # the worker may still be reading matchers (masks ahead)
        at: list[int] = []
        matchers = []
        for j, r in enumerate(rows):
            st = r[4]
            if st is None or st.matcher is None:
                continue
            if st.matcher.is_error():
                st.error = f"the grammar matcher failed: {st.matcher.get_error()}"
                continue
            at.append(j)
            matchers.append(st.matcher)
        if not at:
            return changed
        allowed = self.grammar.allowed(matchers, sub.device)
        if len(at) == sub.size(0):
            apply_allowed_(sub, allowed)
        else:
            picked = torch.tensor(at, device=sub.device)
            masked = sub.index_select(0, picked)
            apply_allowed_(masked, allowed)
            sub.index_copy_(0, picked, masked)
        if self.timing is not None:
            if sub.is_cuda:
                torch.cuda.synchronize(sub.device)  # the kernels' time, not their launch
            self.timing.record_step("mask", len(at), time.perf_counter_ns() - t0)
            self._masked_rows = len(at)
        for j in at:
            changed[j] = True
        return changed

    def _track(self, final: torch.Tensor, rows) -> None:
        """Records each stateful row's chosen token (the argmax of what is returned, which is
        what the manager takes) and ends the request where the grammar says so."""
        stateful = [j for j, r in enumerate(rows) if r[4] is not None]
        if not stateful:
            return
        best = (final if len(stateful) == final.size(0) else final[stateful]).max(dim=-1)
        chosen = best.indices.tolist()
        top = best.values.tolist()
        timing, consume_ns, consumed = self.timing, 0, 0
        if self.grammar is not None:
            self.grammar.wait()  # no matcher is consumed while the worker reads it
        ahead = []  # matchers that go on: their next masks are computed while the model runs
        for k, j in enumerate(stateful):
            st: RowState = rows[j][4]
            request_state = rows[j][5]
            token = chosen[k]
            if st.error is None and top[k] == -math.inf:
                st.error = (
                    "no token is allowed at this step: the grammar admits only end-of-sequence "
                    "or stop tokens, and min_new_tokens forbids them yet"
                )
            if st.error is not None:
                _end_after_this_token(request_state)
                continue
            st.generated.append(token)
            if st.history is not None:
                st.history.add(token)
            m = st.matcher
            if m is None:
                continue
            t0 = time.perf_counter_ns() if timing is not None else 0
            ok = m.consume_token(token)
            if timing is not None:
                consume_ns += time.perf_counter_ns() - t0
                consumed += 1
            if not ok:
                st.error = f"the grammar matcher failed: {m.get_error()}"
                _end_after_this_token(request_state)
            elif m.is_stopped():
                st.done = True
                _end_after_this_token(request_state)
            else:
                ahead.append(m)
        if consumed:
            timing.record_step("consume", consumed, consume_ns)
        if self.grammar is not None:
            self.grammar.prefetch(ahead)

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
        for j, r in enumerate(rows):
            request_id, step, s = r[1], r[2], r[3]
            if not (s.logprobs or s.top_n):
                continue
            ids_j: list[int] = []
            lps_j: list[float] = []
            for n in range(s.top_n):
                if top_lp[j][n] == -math.inf:
                    break  # filtered out by top-k/top-p or masked: not an alternative
                ids_j.append(top_ids[j][n])
                lps_j.append(top_lp[j][n])
            self.book.put(request_id, step, TokenLogprobs(chosen_lp[j], ids_j, lps_j))


def _end_after_this_token(request_state) -> None:
    """Makes the manager finish the request with the token of this step: its per-request token
    limit becomes what it has generated plus this one (`RequestState.update_and_check_completion`
    appends the token, then finishes at the limit)."""
    request_state._new_tokens_limit = request_state.generated_len() + 1


def build_processor_list(
    book: LogprobBook,
    grammar: GrammarBackend | None = None,
    prompts: PromptScorer | None = None,
) -> ContinuousBatchingLogitsProcessorList:
    """The manager's processor list, with our sampler as its only processor."""
    plist = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
    timing = guided_timing.from_env() if grammar is not None else None
    plist.logits_processor = LogitsProcessorList(
        [PerRequestSampler(book, grammar, timing, prompts)]
    )
    plist.tensors_required = 1
    plist._retrieve_processors_kwargs()
    plist.do_processing = True
    return plist


def row_spec(req, end_ids: frozenset[int] = frozenset()) -> RowSpec | None:
    """The RowSpec of a wire request (`end_ids`: the ids that would end it), or None when the
    row needs nothing (plain greedy)."""
    sampling = req.sampling
    rep = float(sampling.repetition_penalty)
    adjust = dict(
        repetition_penalty=rep if rep > 0 else 1.0,  # 0: unset on the wire
        frequency_penalty=float(sampling.frequency_penalty),
        presence_penalty=float(sampling.presence_penalty),
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in req.logit_bias.items())),
        min_new_tokens=int(req.min_new_tokens),
        end_ids=tuple(sorted(end_ids)) if req.min_new_tokens else (),
        resumed=int(req.resumed_tokens),
    )
    plain = (
        adjust["repetition_penalty"] == 1.0
        and not adjust["frequency_penalty"]
        and not adjust["presence_penalty"]
        and not adjust["logit_bias"]
        and not adjust["min_new_tokens"]
        and not req.HasField("grammar")
    )
    if plain and not sampling.do_sample and not req.return_logprobs and not req.top_n_tokens:
        return None
    if not sampling.do_sample:
        return RowSpec(logprobs=req.return_logprobs, top_n=req.top_n_tokens, **adjust)
    return RowSpec(
        do_sample=True,
        temperature=float(sampling.temperature) if sampling.temperature > 0 else 1.0,
        top_k=int(sampling.top_k),
        top_p=float(sampling.top_p) if 0.0 < sampling.top_p < 1.0 else 1.0,
        typical_p=float(sampling.typical_p) if 0.0 < sampling.typical_p < 1.0 else 1.0,
        # Unseeded requests still differ from one another.
        seed=int(sampling.seed) if sampling.HasField("seed") else random.getrandbits(63),
        logprobs=req.return_logprobs,
        top_n=req.top_n_tokens,
        **adjust,
    )


def needs_state(spec: RowSpec | None, grammar: bool) -> bool:
    """Whether a request carries a RowState: it does when anything of it outlives a step."""
    return grammar or (spec is not None and (spec.penalized or bool(spec.logit_bias)))
