"""The lifecycle's clock: the wall-clock seconds that task records store and that expiry, TTLs, queue timeouts,
reaping and retries are judged by. One per app or worker, handed to what needs it, so a test can move its own
clock forward instead of sleeping."""

from __future__ import annotations

import time


class Clock:
    def now(self) -> float:
        """Seconds since the epoch, as records store them."""
        return time.time()
