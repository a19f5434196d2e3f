"""Guided decoding with llguidance: one tokenizer per served model, one matcher per request, and
the per-step token mask.

The router has already compiled and checked each grammar against the same tokenizer (it answers
422 otherwise); the engine builds its own matcher from the grammar's source, masks every step's
logits to the tokens the matcher allows, and feeds it the token chosen. A matcher that cannot be
built or that enters its error state ends its own request only.

The mask is applied with plain tensor ops rather than llguidance's
`apply_token_bitmask_inplace`: that one is `torch.compile`d, which compiles on first use
(seconds, and a C compiler on CPU) inside the engine's step.

Off the critical path: once a step's tokens are consumed, the matchers' masks for the next step
are computed on a worker thread (llguidance's own threads, without the GIL) while the engine
hands the outputs on and runs the next forward pass; the next step only waits for what is not
done yet. A request's first step (no mask computed ahead) is computed in the step.

Compiled once per grammar: building a matcher takes 1-3 ms (on the executor's event loop, where
`submit` runs), so each distinct grammar is compiled into a few template matchers and every
request gets a copy of one of them (tens of µs). Copies share their template's lexer, so a new
request starts with the lexer states its predecessors built (warm) rather than cold; the price
is that a shared lexer is behind one lock, so the masks of rows copied from one template are
computed one after the other. With a single template per grammar, 64 rows of 3 schemas took
the masks ahead from 1.9 to 2.4 ms per step at p50 and from 4.7 to 21 ms at p99 on an H200
(docs/benchmarks.md), so LEXERS_PER_GRAMMAR templates are handed out in turn. A template
serves TEMPLATE_USES requests, then is compiled anew, which bounds what its lexer accumulates
(llguidance caps a lexer's states).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from tensorgate.executor.engines import guided_timing
from tensorgate.v1 import executor_pb2 as pb

log = logging.getLogger("tensorgate.executor.guided")

try:  # an optional dependency at import time: the engine reports the feature off without it
    import llguidance
    import llguidance.hf
    import llguidance.torch as llg_torch
except ImportError:  # pragma: no cover - llguidance is a declared dependency
    llguidance = None


class GrammarError(ValueError):
    """A grammar the engine cannot enforce; the message is for the user."""


_KINDS = {
    pb.GRAMMAR_KIND_JSON_SCHEMA: "json_schema",
    pb.GRAMMAR_KIND_REGEX: "regex",
    pb.GRAMMAR_KIND_LARK: "lark",
}


# JSON as json.dumps writes it unless the schema's own `x-guidance` says otherwise (llguidance
# applies these defaults first, then the schema's options). With llguidance's default free
# whitespace a small model can spend max_tokens on newlines inside an array and never close the
# value; the router's tool grammars use the same options.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Grammars kept compiled (the least recently used go), templates per grammar (each a lexer and
# a lock of its own), and how many requests one template serves before it is compiled anew.
TEMPLATES = 64
LEXERS_PER_GRAMMAR = 4
TEMPLATE_USES = 256


class _Prefetch:
    """Masks being computed for the next step: row i of `bitmask` is `matchers[i]`'s."""

    __slots__ = ("bitmask", "done", "matchers", "rows")

    def __init__(self, matchers: list, bitmask: torch.Tensor, done: Future) -> None:
        self.matchers = matchers  # held: the ids in `rows` stay theirs
        self.rows = {id(m): i for i, m in enumerate(matchers)}
        self.bitmask = bitmask
        self.done = done


class GrammarBackend:
    """llguidance over the served tokenizer: builds matchers and fills their masks."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        # The model's vocabulary can be larger than the tokenizer's (padded embeddings): the
        # mask covers the logits' width, and ids past the tokenizer are never allowed.
        n_vocab = max(vocab_size, len(hf_tokenizer))
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=n_vocab, eos_token=eos_ids or None
        )
        self.words = (self.tokenizer.vocab_size + 31) // 32
        self._executor = llguidance.LLExecutor()
        self._bitmask = llg_torch.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        # Bit i of each int32 word (bit 31 wraps to the sign bit, which `&` reads the same).
        self._bits = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)
        self._bits_on: dict[torch.device, torch.Tensor] = {}
        self.timing = guided_timing.from_env()  # benchmark-only; None: nothing is timed
        # (kind, source) -> [[template matcher, requests served], ...] (up to
        # LEXERS_PER_GRAMMAR, handed out in turn); used from `submit`'s thread only.
        self._templates: OrderedDict[tuple[str, str], list] = OrderedDict()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._pending: _Prefetch | None = None

    @classmethod
    def load(cls, model_dir: Path, vocab_size: int, eos_ids: list[int]) -> GrammarBackend | None:
        """The backend for a checkpoint's tokenizer, or None (logged) when there is none that
        llguidance can read: the engine then says it has no guided decoding."""
        if llguidance is None:
            log.warning("guided decoding off: the llguidance package is not installed")
            return None
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(model_dir)
            return cls(hf, vocab_size, eos_ids)
        except Exception as e:  # no tokenizer, or a slow one llguidance cannot read
            log.warning("guided decoding off: no tokenizer to read in %s (%s)", model_dir, e)
            return None

    def matcher(self, grammar: pb.Grammar) -> llguidance.LLMatcher:
        t0 = time.perf_counter_ns() if self.timing is not None else 0
        kind = _KINDS.get(grammar.kind)
        if kind is None:
            raise GrammarError(f"grammar kind {grammar.kind} is not one this engine knows")
        key = (kind, grammar.value)
        entries = self._templates.get(key, [])
        if len(entries) < LEXERS_PER_GRAMMAR:
            # Raises for a grammar that cannot be built: nothing is kept for it then.
            entries.append([self._compile(kind, grammar.value), 0])
        self._templates[key] = entries
        self._templates.move_to_end(key)
        if len(self._templates) > TEMPLATES:
            self._templates.popitem(last=False)
        entry = min(entries, key=lambda e: e[1])  # the least used: each serves in turn
        if entry[1] >= TEMPLATE_USES:
            entry[:] = [self._compile(kind, grammar.value), 0]
        entry[1] += 1
        m = entry[0].deep_copy()  # shares the template's lexer (see the module's doc)
        if self.timing is not None:
            self.timing.record_build(time.perf_counter_ns() - t0)
        return m

    def _compile(self, kind: str, value: str) -> llguidance.LLMatcher:
        try:
            if kind == "json_schema":
                source = llguidance.LLMatcher.grammar_from_json_schema(
                    value, defaults=JSON_DEFAULTS
                )
            else:
                source = llguidance.grammar_from(kind, value)
        except ValueError as e:
            raise GrammarError(f"grammar ({kind}): {e}") from None
        m = llguidance.LLMatcher(self.tokenizer, source, log_level=0)
        if m.is_error():
            raise GrammarError(f"grammar ({kind}): {_first_line(m.get_error())}")
        return m

    def _fill(self, pairs: list[tuple[llguidance.LLMatcher, int]], bitmask: torch.Tensor) -> None:
        if len(pairs) > 1:
            # One call for the batch: llguidance computes the masks in its own threads, without
            # the GIL. One row is done on the calling thread: no hop to the pool.
            llg_torch.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
        else:
            for m, i in pairs:
                llg_torch.fill_next_token_bitmask(m, bitmask, i)

    def _fill_timed(self, pairs, bitmask: torch.Tensor) -> None:
        t0 = time.perf_counter_ns()
        self._fill(pairs, bitmask)
        if self.timing is not None:
            self.timing.record_step("prefetch", len(pairs), time.perf_counter_ns() - t0)

    def wait(self) -> None:
        """Returns once no matcher is being read by the worker: call it before touching any
        matcher in the engine's thread (a matcher in use there cannot be borrowed)."""
        if self._pending is not None:
            self._pending.done.exception()  # waits; a failure is seen (and redone) by allowed()

    def prefetch(self, matchers: list[llguidance.LLMatcher]) -> None:
        """Starts computing these matchers' next masks on the worker, replacing what was
        pending. Call it right after the step's tokens are consumed, and consume nothing before
        the next `allowed`: a mask computed before a matcher's last token would be wrong."""
        self.wait()
        self._pending = None
        if not matchers:
            return
        bitmask = torch.empty(len(matchers), self.words, dtype=torch.int32)
        pairs = [(m, i) for i, m in enumerate(matchers)]
        fill = self._fill_timed if self.timing is not None else self._fill
        self._pending = _Prefetch(matchers, bitmask, self._worker.submit(fill, pairs, bitmask))

    def _bitmask_for(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """The matchers' next masks as int32 words [n, words], from the prefetch where it has
        them, computed here for the rest (a request's first step, a failed prefetch)."""
        n = len(matchers)
        pending, self._pending = self._pending, None
        hits: list[int | None] = [None] * n
        if pending is not None and pending.done.exception() is None:
            hits = [pending.rows.get(id(m)) for m in matchers]
            if hits == list(range(len(pending.matchers))):
                return pending.bitmask  # the same rows in the same order: the common case
        if self._bitmask.size(0) < n:
            self._bitmask = llg_torch.allocate_token_bitmask(n, self.tokenizer.vocab_size)
        bitmask = self._bitmask[:n]
        have = [(i, h) for i, h in enumerate(hits) if h is not None]
        if have:
            to, src = zip(*have, strict=True)
            bitmask[list(to)] = pending.bitmask[list(src)]
        missing = [(m, i) for i, m in enumerate(matchers) if hits[i] is None]
        if missing:
            self._fill(missing, bitmask)
        return bitmask

    def allowed(self, matchers: list[llguidance.LLMatcher], device: torch.device) -> torch.Tensor:
        """The tokens each matcher allows next, as a bool tensor [len(matchers), vocab]."""
        n = len(matchers)
        bitmask = self._bitmask_for(matchers)
        bits_on = self._bits_on.get(device)
        if bits_on is None:
            bits_on = self._bits_on[device] = self._bits.to(device)
        words = bitmask.to(device, non_blocking=True)
        bits = (words.unsqueeze(-1) & bits_on) != 0
        return bits.view(n, self.words * 32)


def apply_allowed_(rows: torch.Tensor, allowed: torch.Tensor) -> None:
    """Masks `rows` [n, vocab] to `allowed` [n, >= vocab] in place."""
    rows.masked_fill_(~allowed[:, : rows.size(1)], -math.inf)


def _first_line(s: str) -> str:
    line = s.strip().splitlines()[0] if s.strip() else "invalid grammar"
    return line if len(line) <= 300 else line[:300] + "…"
