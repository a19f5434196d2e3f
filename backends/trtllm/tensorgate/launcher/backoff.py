"""The delay before restarting a failed executor: 1 s, doubling up to 30 s, back to 1 s once a
start has become ready."""

from __future__ import annotations

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0


class RestartBackoff:
    """Doubling, so that an executor that fails at every start (a broken GPU, a full disk)
    does not spin, and capped, so that one that recovers is back within half a minute."""

    def __init__(self, first_s: float = FIRST_DELAY_S, max_s: float = MAX_DELAY_S) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError(f"need 0 < first_s <= max_s, got {first_s} and {max_s}")
        self.first_s = first_s
        self.max_s = max_s
        self._next = first_s

    def next_delay(self) -> float:
        """The delay before the next start; each call doubles the one after."""
        delay = self._next
        self._next = min(delay * 2, self.max_s)
        return delay

    def reset(self) -> None:
        """After a start that became ready: the next failure waits first_s again."""
        self._next = self.first_s
