"""The synthetic engine's prefix-cache model: an LRU of full KV blocks keyed by the contract's
chained block hash (executor/kv_blocks.py), publishing what it stores and evicts, so that
KV-aware routing can be measured without a model.

A request's prompt is matched block by block against the cache (the longest cached prefix of
full blocks, and never the whole prompt: at least its last token is computed, as real engines
need its logits); its full blocks are then stored (or touched) and the least recently used
blocks beyond the capacity evicted. When it ends, the full blocks its generated tokens completed
are stored too (the last token has no KV yet), so a conversation's next turn finds its reply.
Blocks are ordered so that a sequence's later blocks are evicted before its earlier ones: an
evicted prefix would leave its continuation unreachable.

It models reuse only: how many requests may run at once is the engine's batch limit, not this
capacity (a real engine's cached blocks live in its free KV memory).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tensorgate.executor.kv_blocks import chain_hashes
from tensorgate.executor.kv_events import KvEventLog


@dataclass
class PrefixStats:
    """Lifetime counts of prompt tokens looked up and found cached."""

    prompt_tokens: int = 0
    cached_tokens: int = 0


class PrefixCache:
    def __init__(self, block_size: int, capacity_blocks: int, events: KvEventLog) -> None:
        if block_size < 1 or capacity_blocks < 1:
            raise ValueError(
                f"block_size ({block_size}) and capacity_blocks ({capacity_blocks}) must be "
                "positive"
            )
        self.block_size = block_size
        self.capacity = capacity_blocks
        self.events = events
        self.stats = PrefixStats()
        # hash -> None, least recently used first. Taken by the engine loop on admission and
        # by the control thread on a flush.
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def admit(self, tokens: Sequence[int]) -> int:
        """Looks the prompt up and stores its full blocks; returns how many of its tokens were
        cached (a multiple of the block size)."""
        hashes = chain_hashes(tokens, self.block_size)
        with self._lock:
            usable = (len(tokens) - 1) // self.block_size
            hit = 0
            while hit < usable and hashes[hit] in self._blocks:
                hit += 1
            self._store(tokens, hashes)
        cached = hit * self.block_size
        self.stats.prompt_tokens += len(tokens)
        self.stats.cached_tokens += cached
        return cached

    def extend(self, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """Stores the full blocks a finished request's generated tokens completed (its prompt's
        blocks were stored on admission)."""
        tokens = list(prompt) + list(generated[:-1])  # the last token was never fed back
        if len(tokens) // self.block_size <= len(prompt) // self.block_size:
            return
        hashes = chain_hashes(tokens, self.block_size)
        with self._lock:
            self._store(tokens, hashes)

    def _store(self, tokens: Sequence[int], hashes: list[int]) -> None:
        """Under the lock: stores the blocks not cached (an event per run of consecutive new
        blocks; a prompt's block evicted while it ran comes back), makes the sequence's blocks
        the most recent with its first block the most recent of all, then evicts down to the
        capacity."""
        b = self.block_size
        run: list[tuple[int, list[int]]] = []
        run_parent: int | None = None
        for i in range(len(hashes)):
            h = hashes[i]
            if h in self._blocks:
                self._flush_run(run_parent, run)
                run = []
                continue
            if not run:
                run_parent = hashes[i - 1] if i else None
            run.append((h, list(tokens[i * b : (i + 1) * b])))
            self._blocks[h] = None
        self._flush_run(run_parent, run)
        for h in reversed(hashes):
            self._blocks.move_to_end(h)
        evicted = []
        while len(self._blocks) > self.capacity:
            evicted.append(self._blocks.popitem(last=False)[0])
        self.events.removed(evicted)

    def _flush_run(self, parent: int | None, run: list[tuple[int, list[int]]]) -> None:
        if run:
            self.events.stored(parent, run)

    def clear(self) -> int:
        """Drops every block (one all_cleared event); returns how many there were."""
        with self._lock:
            n = len(self._blocks)
            self._blocks.clear()
            self.events.cleared()
        return n
