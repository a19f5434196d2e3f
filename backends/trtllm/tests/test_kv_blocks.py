"""The contract's block hash (executor/kv_blocks.py), the event log engines publish through and
the synthetic engine's prefix-cache model (an LRU of blocks), checked against a replica that
only sees the events, as a router's index would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.continuous_batching.cache_allocators.cache_allocator import (
    compute_block_hash,
)

from tensorgate.executor.engines.synthetic_prefix_cache import PrefixCache
from tensorgate.executor.kv_blocks import block_hash, chain_hashes
from tensorgate.executor.kv_events import KvEventLog

pytestmark = pytest.mark.timeout(120)

TOKENS = st.lists(st.integers(0, 2**32 - 1), max_size=80)
HASHES = st.none() | st.integers(0, 2**64 - 1)

# The documented test vectors (docs/architecture.md): block size 4, tokens 1..8.
H1 = 0x9DFEFA18F3387AC8
H2 = 0x1EA95D1403A2D75B


def test_the_documented_vectors():
    assert block_hash(None, [1, 2, 3, 4]) == H1
    assert block_hash(H1, [5, 6, 7, 8]) == H2
    assert chain_hashes(range(1, 10), 4) == [H1, H2]  # the partial third block is not hashed


def test_the_hash_is_the_same_in_another_process():
    # Not Python's hash(): its strings are salted per process, ints are not, but nothing of it
    # is used; a different PYTHONHASHSEED must give the same values.
    code = "from tensorgate.executor.kv_blocks import chain_hashes as c; print(c(range(9), 4))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    src = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=src, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(chain_hashes(range(9), 4))


@given(parent=HASHES, tokens=TOKENS)
def test_the_layout_is_blake2b_8_over_little_endian_words(parent, tokens):
    import hashlib

    data = b"" if parent is None else parent.to_bytes(8, "little")
    data += b"".join(t.to_bytes(4, "little") for t in tokens)
    digest = hashlib.blake2b(data, digest_size=8).digest()
    assert block_hash(parent, tokens) == int.from_bytes(digest, "little")


@given(parent=HASHES, tokens=st.lists(st.integers(0, 2**31 - 1), max_size=80))
def test_it_is_transformers_block_hash(parent, tokens):
    # The transformers engine publishes its ledger's hashes as they are: they must be ours.
    assert block_hash(parent, tokens) == compute_block_hash(parent, tokens)


@given(tokens=TOKENS, block=st.integers(1, 9), split=st.integers(0, 9))
def test_a_chain_continues_from_any_block(tokens, block, split):
    whole = chain_hashes(tokens, block)
    expected, parent = [], None
    for i in range(len(tokens) // block):
        parent = block_hash(parent, tokens[i * block : (i + 1) * block])
        expected.append(parent)
    assert whole == expected
    k = min(split, len(whole))
    assert chain_hashes(tokens[k * block :], block, whole[k - 1] if k else None) == whole[k:]


# -- the event log -------------------------------------------------------------------------------


def test_event_ids_increase_and_a_full_buffer_leaves_a_gap():
    log = KvEventLog(kept=3, per_batch=2)
    for i in range(5):
        log.removed([i])
    assert log.dropped == 2
    first = log.drain()
    second = log.drain()
    assert [e.event_id for e in first.events] == [3, 4]  # 1 and 2 were dropped: the gap
    assert [e.event_id for e in second.events] == [5]
    assert not log.drain().events
    log.cleared()
    log.stored(None, [])  # nothing stored: no event
    log.removed([])
    (ev,) = log.drain().events
    assert ev.event_id == 6 and ev.all_cleared


def test_an_unread_log_keeps_nothing_and_a_reader_gets_the_next_ids():
    """No stream draining for KV_EVENTS_UNREAD_S: events take ids but are not kept (memory
    stays flat with no router subscribed); a reader that comes back gets what follows."""
    now = [0.0]
    log = KvEventLog(unread_s=10.0, clock=lambda: now[0])
    log.removed([1])  # read from creation: kept
    now[0] = 10.5
    for i in range(1000):
        log.removed([i])
    assert log.unread == 1000
    assert not log.drain().events  # the drain cleared the old one too: nothing stale is served
    log.removed([7])
    (ev,) = log.drain().events
    assert ev.event_id == 1002 and list(ev.removed.block_hashes) == [7]


# -- the LRU model -------------------------------------------------------------------------------


class Replica:
    """What a router knows: the set of cached hashes, built from the events alone."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()
        self.last_id = 0

    def apply(self, log: KvEventLog) -> list:
        return self.apply_events(list(log.drain().events))

    def apply_events(self, events: list) -> list:
        for ev in events:
            if self.last_id:
                assert ev.event_id == self.last_id + 1, "ids go up by one (the buffer is large)"
            self.last_id = ev.event_id
            kind = ev.WhichOneof("kind")
            if kind == "stored":
                s = ev.stored
                parent = s.parent_hash if s.HasField("parent_hash") else None
                for b in s.blocks:
                    assert b.block_hash == block_hash(parent, list(b.token_ids))
                    parent = b.block_hash
                    self.blocks.add(b.block_hash)
            elif kind == "removed":
                assert set(ev.removed.block_hashes) <= self.blocks, "only what was stored"
                self.blocks -= set(ev.removed.block_hashes)
            else:
                self.blocks.clear()
        return events


def cached_prefix(replica: Replica, prompt: list[int], block: int) -> int:
    usable = (len(prompt) - 1) // block
    n = 0
    for h in chain_hashes(prompt, block)[:usable]:
        if h not in replica.blocks:
            break
        n += 1
    return n * block


PREFIXES = [list(range(100 * p, 100 * p + 40)) for p in range(3)]
PROMPTS = st.builds(
    lambda p, cut, tail: PREFIXES[p][:cut] + tail,
    st.integers(0, 2),
    st.integers(0, 40),
    st.lists(st.integers(1000, 1003), max_size=12),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), PROMPTS),
        st.tuples(st.just("extend"), PROMPTS, st.lists(st.integers(2000, 2003), max_size=20)),
        st.tuples(st.just("clear")),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, block=st.integers(1, 6), capacity=st.integers(1, 12))
def test_the_events_mirror_the_cache_and_hits_match_them(ops, block, capacity):
    log = KvEventLog()
    cache = PrefixCache(block, capacity, log)
    replica = Replica()
    for op in ops:
        if op[0] == "admit":
            prompt = op[1] or [7]
            expected = cached_prefix(replica, prompt, block)
            assert cache.admit(prompt) == expected
            # All of its full blocks are cached now, unless the capacity is smaller.
            replica.apply(log)
            full = chain_hashes(prompt, block)
            assert set(full[:capacity]) <= replica.blocks
        elif op[0] == "extend":
            cache.extend(op[1], op[2])
            replica.apply(log)
        else:
            cache.clear()
            replica.apply(log)
        assert len(cache) <= capacity
        assert replica.blocks == set(cache._blocks)


def test_eviction_takes_a_sequence_s_last_blocks_first():
    log = KvEventLog()
    cache = PrefixCache(2, 4, log)
    a = [1, 2, 3, 4, 5, 6, 7]  # three full blocks
    b = [9, 9, 8, 8, 7]  # two
    ha, hb = chain_hashes(a, 2), chain_hashes(b, 2)
    assert cache.admit(a) == 0
    assert cache.admit(b) == 0
    events = Replica().apply(log)
    assert [list(e.removed.block_hashes) for e in events if e.HasField("removed")] == [[ha[2]]]
    # a's first two blocks are still there and still reachable.
    assert cache.admit(a[:5]) == 4
    assert ha[0] in cache and ha[1] in cache and hb[0] in cache


def test_the_whole_prompt_is_never_a_hit():
    cache = PrefixCache(4, 100, KvEventLog())
    prompt = list(range(8))
    cache.admit(prompt)
    assert cache.admit(prompt) == 4  # the last token is computed: its logits are needed
    assert cache.admit([*prompt, 99]) == 8
    assert cache.stats.prompt_tokens == 25 and cache.stats.cached_tokens == 12


def test_generated_blocks_are_stored_with_their_parent():
    log = KvEventLog()
    cache = PrefixCache(4, 100, log)
    prompt = [1, 2, 3, 4, 5, 6]
    cache.admit(prompt)
    log.drain()
    cache.extend(prompt, [7, 8, 9, 10, 11])  # 1..10 have KV (not 11): block [5..8] is new
    (ev,) = log.drain().events
    hashes = chain_hashes(list(range(1, 11)), 4)
    assert ev.stored.parent_hash == hashes[0]
    assert [(b.block_hash, list(b.token_ids)) for b in ev.stored.blocks] == [
        (hashes[1], [5, 6, 7, 8])
    ]
    assert cache.admit([*range(1, 11), 50]) == 8  # the next turn finds the reply
