"""Failed logins slow a guesser down: after a few wrong passwords from one address, that
address is refused for a while without its passwords being checked.

Counted per client address (a user name is easy to vary, an address less so), over a sliding
window; a right password clears the count. While locked out, Basic requests and the console's
login form get HTTP 429 with ``Retry-After``; each lock-out is logged once (``login_locked``,
the address and the count, never a password or the user name tried).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from fracture_node.logs import get_logger

log = get_logger("http")

MAX_TRACKED = 10_000
"""Addresses remembered at most (the oldest are forgotten first): a flood cannot grow memory."""


class LoginThrottle:
    """Counts failed logins per address; :meth:`retry_after` says whether one is locked out."""

    def __init__(self, max_failures: int, window_s: float, lockout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def retry_after(self, peer: str) -> float:
        """Seconds until ``peer`` may try again; 0 when it may now."""
        if self.max_failures <= 0:
            return 0.0
        with self._lock:
            until = self._locked_until.get(peer)
            if until is None:
                return 0.0
            left = until - self._clock()
            if left <= 0:
                del self._locked_until[peer]
                self._failures.pop(peer, None)
                return 0.0
            return left

    def failed(self, peer: str) -> None:
        """One wrong password from ``peer``; locks it out at ``max_failures`` in the window."""
        if self.max_failures <= 0:
            return
        now = self._clock()
        with self._lock:
            times = self._failures.pop(peer, None) or deque()
            self._failures[peer] = times  # re-inserted: the dict keeps recent peers last
            times.append(now)
            while times and times[0] < now - self.window_s:
                times.popleft()
            count = len(times)
            if count >= self.max_failures and peer not in self._locked_until:
                self._locked_until[peer] = now + self.lockout_s
                log.warning("login_locked", peer=peer, failures=count,
                            lockout_s=self.lockout_s, window_s=self.window_s)
            while len(self._failures) > MAX_TRACKED:
                oldest = next(iter(self._failures))
                del self._failures[oldest]

    def succeeded(self, peer: str) -> None:
        with self._lock:
            self._failures.pop(peer, None)
