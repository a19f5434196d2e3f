"""The block hash of the contract's KV-cache events, for engines that hash blocks themselves
(synthetic, transformers), and what a router computes to look a prompt up in its index.

A prompt is cut into full blocks of `block_size` tokens (the executor's `Stats.kv_block_size`;
a partial last block is never cached). Block i's hash chains block i-1's:

    h_0 = H(None, tokens[0:B]),  h_i = H(h_{i-1}, tokens[i*B:(i+1)*B])

H(parent, tokens) is BLAKE2b with an 8-byte digest (the digest_size parameter set to 8: not a
truncated BLAKE2b-512; no key, salt or personalization) over these bytes:

    parent as 8 bytes, unsigned little-endian    (absent, not zero, for a sequence's first block)
    each token id as 4 bytes, unsigned little-endian, in order

and the 8-byte digest read as an unsigned little-endian 64-bit integer. In Rust:
`blake2::Blake2b<U8>` (router/src/executors/routing/block_hash.rs), `u64::from_le_bytes`.
Test vectors (block_size 4):
H(None, [1, 2, 3, 4]) and H(that, [5, 6, 7, 8]) are in docs/architecture.md.

It is the layout of transformers' own `compute_block_hash` (continuous batching, 5.18 to at least
5.24, on little-endian hosts), so the transformers engine's ledger hashes are these very values.
TensorRT-LLM hashes its blocks its own way: its events carry its hashes, and every stored block
carries its tokens, so a router that wants one rule for every engine hashes the tokens itself and
uses an event's `block_hash` only as the name that later `removed` events refer to.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

_U32 = array("I")
if _U32.itemsize != 4:  # pragma: no cover - every platform CPython supports has 4-byte ints
    raise ImportError("the block hash needs a 4-byte unsigned int array type")


def _le_u32(tokens: Sequence[int]) -> bytes:
    data = array("I", tokens)
    if sys.byteorder == "big":  # pragma: no cover - the layout is little-endian everywhere
        data.byteswap()
    return data.tobytes()


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The hash of one block of `tokens` whose previous block hashed to `parent` (None for a
    sequence's first block)."""
    h = hashlib.blake2b(digest_size=8)
    if parent is not None:
        h.update(parent.to_bytes(8, "little", signed=False))
    h.update(_le_u32(tokens))
    return int.from_bytes(h.digest(), "little", signed=False)


def chain_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """The hashes of the full blocks of `tokens`, chained on from `parent`: the hash of the
    block before `tokens[0]` (None when `tokens` starts a sequence)."""
    raw = _le_u32(tokens)
    step = 4 * block_size
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        h = hashlib.blake2b(digest_size=8)
        if parent is not None:
            h.update(parent.to_bytes(8, "little", signed=False))
        h.update(raw[i * step : (i + 1) * step])
        parent = int.from_bytes(h.digest(), "little", signed=False)
        out.append(parent)
    return out
