"""A standalone reaping loop (``celery dlq reap --loop``) for hosts without beat or cron."""

from __future__ import annotations

import logging
import threading
from typing import Callable

logger = logging.getLogger("celery_dlq")


class ReaperLoop:
    """Run ``reap()`` every ``interval`` seconds until stopped.

    The first pass runs at once.  After ``k`` consecutive failures the next pass waits
    ``interval * 2**k`` (capped at ``max_factor * interval``); a success resets it.
    ``stop()`` ends the wait immediately.
    """

    def __init__(self, reap: Callable[[], object], interval: float, *, max_factor: int = 32,
                 wait: Callable[[float], bool] | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.reap = reap
        self.interval = float(interval)
        self.max_factor = max_factor
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self.failures = 0
        self.passes = 0

    def next_delay(self) -> float:
        return self.interval * min(2 ** self.failures, self.max_factor)

    def run_once(self) -> float:
        """One pass; returns the delay before the next one."""
        self.passes += 1
        try:
            self.reap()
        except Exception as exc:
            self.failures += 1
            delay = self.next_delay()
            logger.error("celery_dlq: reaping failed (%d in a row): %s; next try in %.1fs",
                         self.failures, exc, delay)
            return delay
        self.failures = 0
        return self.interval

    def run(self) -> None:
        while not self._stop.is_set():
            delay = self.run_once()
            if self._stop.is_set() or self._wait(delay):
                break

    def stop(self) -> None:
        self._stop.set()
