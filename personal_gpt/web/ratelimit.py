"""An in-memory sliding-window limiter per key (a client address, a key id), for
the HTTP layers: at most ``limit`` events per key in any ``window`` seconds. Per
process and forgetful by design (the oldest keys go beyond ``max_clients``); the
durable per-visitor and per-GPT message limits live in ``personal_gpt.limits``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from typing import Callable


class WindowLimiter:
    """``hit(key)`` records an event; ``retry_after(key)`` says how long ``key`` must
    wait (None: it may go now); ``take(key)`` does both at once — records the event
    only when allowed, so a refused request does not lengthen its own wait."""

    def __init__(self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000):
        if limit < 1 or window <= 0:
            raise ValueError("limit must be at least 1 and window positive")
        self.limit, self.window, self.clock, self.max_clients = limit, window, clock, max_clients
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._events.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._events[key]
            return None
        return times

    def _wait(self, times: deque[float] | None, now: float) -> int | None:
        if times is None or len(times) < self.limit:
            return None
        return max(1, math.ceil(times[-self.limit] + self.window - now))

    def _record(self, key: str, times: deque[float] | None, now: float) -> None:
        times = times if times is not None else deque()
        times.append(now)
        while len(times) > self.limit:
            times.popleft()
        self._events[key] = times
        self._events.move_to_end(key)
        while len(self._events) > self.max_clients:
            self._events.popitem(last=False)

    def retry_after(self, key: str) -> int | None:
        """Seconds until ``key`` may go again, or None when it may now."""
        with self._lock:
            now = self.clock()
            return self._wait(self._recent(key, now), now)

    def hit(self, key: str) -> None:
        """Count one event for ``key`` (allowed or not)."""
        with self._lock:
            now = self.clock()
            self._record(key, self._recent(key, now), now)

    def take(self, key: str) -> int | None:
        """None and the event counted when ``key`` is within its limit; otherwise the
        seconds to wait, and nothing counted."""
        with self._lock:
            now = self.clock()
            times = self._recent(key, now)
            wait = self._wait(times, now)
            if wait is None:
                self._record(key, times, now)
            return wait
