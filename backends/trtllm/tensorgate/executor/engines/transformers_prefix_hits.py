"""How many prompt tokens each request took from the prefix cache of transformers' continuous
batching: its first output's `cached_tokens` (OpenAI's usage.prompt_tokens_details).

transformers (5.18 to at least 5.24) matches a waiting request's prompt against its cached blocks
in `PagedAttentionCache.search_prefix_match(request_id, prompt_ids)`, which returns the tokens
matched (whole blocks, never the whole prompt), and keeps no record of it: the scheduler only
shortens the request's prefill by that much (`scheduler.py`, `_infer_request_tokens`). So the
cache's method is wrapped, on the cache object itself, to note what it returns. The call runs in
the manager's thread while it schedules, before the request's first token, which is read back
in the same thread. A request matched again (re-queued after a preemption) keeps the last match.
"""

from __future__ import annotations

import threading


class PrefixHits:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the manager's thread notes; cancellations forget
        self._hits: dict[str, int] = {}

    def install(self, cache) -> bool:
        """Wraps `cache.search_prefix_match`; False when this cache shares no prefix (nothing is
        ever matched) or has no such method (another transformers)."""
        if not getattr(cache, "use_prefix_sharing", False):
            return False
        search = getattr(cache, "search_prefix_match", None)
        if search is None:
            return False

        def noted(request_id: str, prompt_ids: list[int]) -> int:
            matched = search(request_id, prompt_ids)
            with self._lock:
                if matched:
                    self._hits[request_id] = int(matched)
                else:
                    self._hits.pop(request_id, None)
            return matched

        cache.search_prefix_match = noted
        return True

    def take(self, request_id: str) -> int:
        """The prompt tokens `request_id` took from the cache (0: none), forgotten once read."""
        with self._lock:
            return self._hits.pop(request_id, 0)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._hits.pop(request_id, None)

    def clear(self) -> None:
        with self._lock:
            self._hits.clear()
