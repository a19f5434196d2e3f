"""KV-cache events from transformers' continuous batching: the prefix blocks its paged cache
really holds, published on the contract.

transformers (5.18 to at least 5.24) shares prefixes through a `BlockLedger` per cache allocator:
`hash_to_block` maps the content hash of every complete block it keeps, live or cached for
reuse, to the block. Its hash is `compute_block_hash`, which is the contract's
(executor/kv_blocks.py; checked at start: a transformers that hashes otherwise gets no events
rather than wrong ones). transformers has no hook or event of its own, so after each step, in
the manager's thread (the only one that changes the ledger), the ledger's hashes are compared
with those seen before: new ones are published as stored, gone ones (evicted under memory
pressure, or dropped with an offloaded request) as removed. A stored block needs its tokens and
its parent, which the ledger does not keep: they come from the step's outputs (each carries its
request's prompt and generated tokens), whose block chains are hashed here the same way. A new
hash no output of the step accounts for (a prompt prefilled in chunks, which outputs nothing
until its last chunk) waits for a later step; one still unaccounted for after
`UNRESOLVED_STEPS` (its request was cancelled mid-prefill) is never published.

A full comparison is a set difference over the ledger's hashes (about 1.5 ms at 20 000 blocks on
this 2-core machine), so a step avoids it when the ledger's growth is exactly the blocks its
requests just completed (looked up one by one), or when it did not change size. Blocks stored
and removed within one step in numbers that hide each other are published by the first step
of a full comparison, which comes at least every `FULL_DIFF_S` while the engine steps. Nothing
runs when prefix sharing is off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from tensorgate.executor.kv_blocks import block_hash, chain_hashes
from tensorgate.executor.kv_events import KvEventLog

log = logging.getLogger("tensorgate.executor.transformers")

UNRESOLVED_STEPS = 64
FULL_DIFF_S = 1.0


def transformers_hashes_match() -> str | None:
    """None when transformers' block hash is the contract's; otherwise why not."""
    try:
        from transformers.generation.continuous_batching.cache_allocators.cache_allocator import (
            compute_block_hash,
        )
    except ImportError as e:
        return f"this transformers has no compute_block_hash ({e})"
    first = compute_block_hash(None, [1, 2, 3, 4])
    if first != block_hash(None, [1, 2, 3, 4]) or compute_block_hash(
        first, [5, 6, 7, 8]
    ) != block_hash(first, [5, 6, 7, 8]):
        return "this transformers hashes blocks differently from the contract"
    return None


class LedgerEvents:
    def __init__(self, block_size: int, events: KvEventLog) -> None:
        self.block_size = block_size
        self.events = events
        self._lock = threading.Lock()
        self._seen: set[int] = set()  # the ledger's hashes at the last step (published or not)
        self._published: set[int] = set()
        self._waiting: dict[int, int] = {}  # new hash -> steps it has waited for its tokens
        self._chains: dict[str, list[int]] = {}  # request id -> hashes of its full blocks
        self._warned = False
        self._last_full = 0.0  # monotonic time of the last full comparison

    def ledger_hashes(self, cache) -> dict | None:
        """The ledger's hash -> block map, or None when this cache shares no prefix."""
        if cache is None or not getattr(cache, "use_prefix_sharing", False):
            return None
        allocators = list(cache.cache_allocators.values())
        if len(allocators) != 1 or allocators[0].tokens_per_page != self.block_size:
            if not self._warned:
                self._warned = True
                log.warning(
                    "KV-cache events off: the cache has %d allocator(s) with pages of %s tokens",
                    len(allocators),
                    [a.tokens_per_page for a in allocators],
                )
            return None
        return allocators[0].ledger.hash_to_block

    def after_step(self, cache, outputs: Sequence) -> None:
        """In the manager's thread, after a step: publishes what its ledger gained and lost."""
        current = self.ledger_hashes(cache)
        if current is None:
            return
        with self._lock:
            fresh = self._extend_chains(outputs)
            now = time.monotonic()
            grown = len(current) - len(self._seen) - len(self._waiting)
            if not self._waiting and now - self._last_full < FULL_DIFF_S:
                if grown == 0:
                    return
                if grown > 0:
                    # Blocks completed this step are among the chains' newest: when they
                    # account for all the growth, nothing was removed.
                    found = {h for h in fresh if h in current and h not in self._seen}
                    if len(found) == grown:
                        self._publish(found, outputs)
                        return
            self._last_full = now
            keys = current.keys()
            gone = self._seen - keys
            if gone:
                self._seen -= gone
                self.events.removed(h for h in gone if h in self._published)
                self._published -= gone
            new = keys - self._seen
            for h in self._waiting.keys() - new:
                del self._waiting[h]  # gone before it could be published
            if new:
                self._publish(new, outputs)

    def _extend_chains(self, outputs: Sequence) -> list[int]:
        """Hashes the full blocks each output's request gained; returns the hashes that may
        have entered the ledger in this step (a block is registered once its last token has
        KV, a step after it becomes full when that token was just generated)."""
        b = self.block_size
        chains: dict[str, list[int]] = {}
        fresh: list[int] = []
        for res in outputs:
            prompt, generated = res.prompt_ids, res.generated_tokens
            chain = self._chains.get(res.request_id, [])
            had = len(chain)
            full = (len(prompt) + len(generated)) // b
            if full > had:
                parent = chain[-1] if chain else None
                chain = chain + chain_hashes(
                    _tokens(prompt, generated, had * b, full * b), b, parent
                )
            fresh += chain[max(had - 1, 0) :]
            chains[res.request_id] = chain
        # Only this step's requests are kept: a finished or cancelled one drops out here (one
        # prefilling in chunks, which outputs nothing meanwhile, is hashed again later).
        self._chains = chains
        return fresh

    def _publish(self, new: set[int], outputs: Sequence) -> None:
        """Publishes the new hashes the step's requests account for, as runs of consecutive
        blocks; the others wait for a later step."""
        b = self.block_size
        for res in outputs:
            prompt, generated = res.prompt_ids, res.generated_tokens
            chain = self._chains[res.request_id]
            run: list[tuple[int, list[int]]] = []
            run_parent = None
            for i, h in enumerate(chain):
                if h in new:
                    if not run:
                        run_parent = chain[i - 1] if i else None
                    run.append((h, _tokens(prompt, generated, i * b, (i + 1) * b)))
                    new.discard(h)
                    self._seen.add(h)
                    self._published.add(h)
                    self._waiting.pop(h, None)
                elif run:
                    self.events.stored(run_parent, run)
                    run = []
            if run:
                self.events.stored(run_parent, run)
        for h in new:
            tries = self._waiting.get(h, 0) + 1
            if tries >= UNRESOLVED_STEPS:
                del self._waiting[h]
                self._seen.add(h)  # never published, so never removed either
            else:
                self._waiting[h] = tries

    def cleared(self) -> None:
        """The cache was flushed or dropped: one all_cleared, and nothing is known any more."""
        with self._lock:
            self._seen.clear()
            self._published.clear()
            self._waiting.clear()
            self._chains.clear()
            self.events.cleared()


def _tokens(prompt: Sequence[int], generated: Sequence[int], lo: int, hi: int) -> list[int]:
    """Tokens [lo, hi) of prompt + generated, without joining the two whole."""
    n = len(prompt)
    if hi <= n:
        return list(prompt[lo:hi])
    if lo >= n:
        return list(generated[lo - n : hi - n])
    return list(prompt[lo:]) + list(generated[: hi - n])
