"""Background loops in threads, each watched: a loop that dies is logged and restarted with backoff, and one that
dies too often is marked failed so that health says so."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

log = logging.getLogger(__name__)


class Component(str, Enum):
    """The state of one background loop."""

    RUNNING = "running"
    DONE = "done"  # finished its work (the model loader)
    RESTARTING = "restarting"
    FAILED = "failed"  # died too often, or cannot be restarted
    STOPPED = "stopped"


@dataclass
class _Loop:
    name: str
    target: Callable[[], None]
    forever: bool
    on_crash: Callable[[BaseException], None] | None
    state: Component = Component.RUNNING
    crashes: list[float] = field(default_factory=list)
    thread: threading.Thread | None = None


class Supervisor:
    """Runs background loops in threads; a loop that raises is logged and restarted with backoff, and after
    `max_restarts` crashes within `window` seconds it is marked FAILED (and health says so)."""

    def __init__(self, max_restarts: int = 5, window: float = 60.0):
        self.max_restarts, self.window = max_restarts, window
        self.stopping = threading.Event()
        self._loops: dict[str, _Loop] = {}

    def spawn(self, name: str, target: Callable[[], None], *, forever: bool = True,
              on_crash: Callable[[BaseException], None] | None = None) -> None:
        loop = _Loop(name, target, forever, on_crash)
        loop.thread = threading.Thread(target=self._guard, args=(loop,), name=name, daemon=True)
        self._loops[name] = loop
        loop.thread.start()

    def _guard(self, loop: _Loop) -> None:
        while True:
            try:
                loop.target()
                if self.stopping.is_set() or not loop.forever:
                    loop.state = Component.STOPPED if self.stopping.is_set() else Component.DONE
                    return
                raise RuntimeError(f"the {loop.name} loop returned while the service runs")
            except BaseException as exc:  # noqa: BLE001 - a dead loop must be seen, whatever killed it
                if self.stopping.is_set():
                    loop.state = Component.STOPPED
                    return
                log.exception("background loop %s died", loop.name)
                if loop.on_crash is not None:
                    try:
                        loop.on_crash(exc)
                    except Exception:  # noqa: BLE001
                        log.exception("cleaning up after %s failed", loop.name)
                now = time.monotonic()
                loop.crashes = [t for t in loop.crashes if now - t < self.window] + [now]
                if len(loop.crashes) > self.max_restarts:
                    log.error("background loop %s died %d times in %.0f s; not restarting it: /health reports it",
                              loop.name, len(loop.crashes), self.window)
                    loop.state = Component.FAILED
                    return
                loop.state = Component.RESTARTING
                if self.stopping.wait(min(5.0, 0.1 * 2 ** len(loop.crashes))):
                    loop.state = Component.STOPPED
                    return
                log.warning("restarting background loop %s", loop.name)
                loop.state = Component.RUNNING

    def states(self) -> dict[str, Component]:
        """Each loop's state; a thread that is gone without saying so counts as FAILED."""
        states = {}
        for name, loop in self._loops.items():
            state = loop.state
            if state in (Component.RUNNING, Component.RESTARTING) and not loop.thread.is_alive():
                state = Component.FAILED
            states[name] = state
        return states

    def alive(self, name: str) -> bool:
        loop = self._loops.get(name)
        return loop is not None and loop.thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        for loop in self._loops.values():
            if loop.thread is not threading.current_thread():
                loop.thread.join(timeout)
