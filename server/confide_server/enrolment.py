"""The enrolment route's failure table: 429 after repeated failed enrolments from one address."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["ENROL_MAX_FAILURES", "ENROL_WINDOW_S", "EnrolLimiter"]

#: Failed enrolments from one address before it is answered 429.
ENROL_MAX_FAILURES = 5
#: Seconds a failure counts against its address.
ENROL_WINDOW_S = 600.0
#: Addresses the limiter remembers (the oldest is forgotten first): bounded memory.
_ENROL_TABLE_SIZE = 4096


class EnrolLimiter:
    """Failed enrolments per remote address, in a bounded table (oldest entries evicted).

    Parameters
    ----------
    max_failures : int
        Failures within ``window_s`` after which an address is refused.
    window_s : float
        How long a failure counts.
    size : int
        Most addresses remembered.
    clock : callable, optional
        Monotonic seconds (tests pass a fake clock).
    """

    def __init__(
        self,
        max_failures: int = ENROL_MAX_FAILURES,
        window_s: float = ENROL_WINDOW_S,
        size: int = _ENROL_TABLE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures, self.window_s, self.size = max_failures, window_s, size
        self._clock = clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, address: str) -> list[float]:
        now = self._clock()
        times = [t for t in self._failures.get(address, []) if now - t < self.window_s]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or ``None`` when it may now."""
        times = self._recent(address)
        if len(times) < self.max_failures:
            return None
        return max(1.0, self.window_s - (self._clock() - times[0]))

    def failed(self, address: str) -> None:
        """Count one failed enrolment from ``address``."""
        times = self._recent(address)
        times.append(self._clock())
        self._failures[address] = times[-self.max_failures :]
        self._failures.move_to_end(address)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)
