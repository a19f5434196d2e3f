"""Guided decoding with llguidance: one tokenizer per served model, one matcher per request, and
the per-step token mask.

The router has already compiled and checked each grammar against the same tokenizer (it answers
422 otherwise); the engine builds its own matcher from the grammar's source, masks every step's
logits to the tokens the matcher allows, and feeds it the token chosen. A matcher that cannot be
built or that enters its error state ends its own request only.

The mask is applied with plain tensor ops rather than llguidance's
`apply_token_bitmask_inplace`: that one is `torch.compile`d, which compiles on first use
(seconds, and a C compiler on CPU) inside the engine's step.
"""

from __future__ import annotations

import logging
import math
import time
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
        try:
            if kind == "json_schema":
                source = llguidance.LLMatcher.grammar_from_json_schema(
                    grammar.value, defaults=JSON_DEFAULTS
                )
            else:
                source = llguidance.grammar_from(kind, grammar.value)
        except ValueError as e:
            raise GrammarError(f"grammar ({kind}): {e}") from None
        m = llguidance.LLMatcher(self.tokenizer, source, log_level=0)
        if m.is_error():
            raise GrammarError(f"grammar ({kind}): {_first_line(m.get_error())}")
        if self.timing is not None:
            self.timing.record_build(time.perf_counter_ns() - t0)
        return m

    def allowed(self, matchers: list[llguidance.LLMatcher], device: torch.device) -> torch.Tensor:
        """The tokens each matcher allows next, as a bool tensor [len(matchers), vocab]."""
        n = len(matchers)
        if self._bitmask.size(0) < n:
            self._bitmask = llg_torch.allocate_token_bitmask(n, self.tokenizer.vocab_size)
        bitmask = self._bitmask[:n]
        if n > 1:
            # One call for the whole batch: llguidance computes the masks in its own threads,
            # without the GIL. One row is done on this thread: no hop to the pool.
            llg_torch.fill_next_token_bitmask_par(
                self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask
            )
        else:
            for i, m in enumerate(matchers):
                llg_torch.fill_next_token_bitmask(m, bitmask, i)
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
