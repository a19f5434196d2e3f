"""KV-cache events on the contract (`KvCacheEventBatch`), from what an engine publishes.

TensorRT-LLM serializes its events (`tensorrt_llm/_utils.py`, `KVCacheEventSerializer`) as
`{"event_id", "data": {"type": ...}, "window_size"}` with `type` one of "stored" (`parent_hash`,
`blocks[]` each with `block_hash` and `tokens[].token_id`), "removed" (`block_hashes`),
"created" and "updated" (cache-level bookkeeping, nothing a router can route on: skipped).
"""

from __future__ import annotations

from collections.abc import Iterable

from tensorgate.v1 import executor_pb2 as pb

_U64 = (1 << 64) - 1


def _hash(h: int) -> int:
    # C++ size_t on the wire; a signed rendering (Python's hash() in tests) maps to the same bits.
    return int(h) & _U64


def batch_from_trtllm(events: Iterable[dict]) -> pb.KvCacheEventBatch:
    batch = pb.KvCacheEventBatch()
    for e in events:
        data = e.get("data") or {}
        kind = data.get("type")
        if kind == "stored":
            ev = batch.events.add(event_id=int(e.get("event_id", 0)))
            ev.stored.SetInParent()
            if data.get("parent_hash") is not None:
                ev.stored.parent_hash = _hash(data["parent_hash"])
            for b in data.get("blocks") or []:
                ev.stored.blocks.add(
                    block_hash=_hash(b["block_hash"]),
                    token_ids=[int(t["token_id"]) for t in b.get("tokens") or []],
                )
        elif kind == "removed":
            ev = batch.events.add(event_id=int(e.get("event_id", 0)))
            ev.removed.block_hashes.extend(_hash(h) for h in data.get("block_hashes") or [])
        elif kind == "cleared":
            batch.events.add(event_id=int(e.get("event_id", 0)), all_cleared=True)
    return batch
