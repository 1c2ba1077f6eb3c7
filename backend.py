"""The contract between the HTTP front and where tasks run, and the supervision of background loops.

`server.py` is typed against `Backend`; `EmbeddedBackend` (one process, tasks on disk) and `RedisBackend`
(tasks in Redis, run by RQ workers) implement it. Health is derived from named component states, so a dead
loop can never hide behind "ok".
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, BinaryIO, Callable, Iterator, Protocol

from PIL import Image

import idempotency
from tasks import ModelState, Task

log = logging.getLogger(__name__)


class Backend(Protocol):
    idempotency: idempotency.Store  # where Idempotency-Keys are kept (files or Redis)

    def start(self) -> None: ...

    def model_defaults(self) -> dict[str, int] | None:
        """The loaded model's num_frames, num_inference_steps, width and height (None before one is ready)."""

    def stop(self) -> None: ...

    def admission(self, mode: str) -> AbstractContextManager[None]:
        """Hold a place in line while the request is decoded; 503 at once when there is none."""

    def submit(self, task: Task, image: Image.Image) -> Task:
        """Put an admitted task in line and return it as accepted."""

    def get(self, task_id: str) -> Task | None: ...

    def wait(self, task_id: str, timeout: float) -> Task | None: ...

    def cancel(self, task_id: str) -> Task | None: ...

    def result(self, task: Task) -> BinaryIO | None:
        """The finished task's video as an open binary file, or None once it is gone."""

    def queue_position(self, task_id: str) -> int | None: ...

    def health(self) -> Health: ...

    def drain(self, timeout: float) -> None: ...

    def metrics(self) -> dict[str, float]: ...


class Places:
    """Places in line held by admitted requests while they are read and decoded.

    `hold` checks there is room (counting held places) and holds one for this thread; `release` gives it up,
    either because the request became a queued task (which the line now counts) or because it ended. Both
    run under the backend's own lock, so a place is never counted twice or not at all.
    """

    def __init__(self, lock):
        self._lock = lock
        self._local = threading.local()
        self.held = 0

    @contextmanager
    def hold(self, check: Callable[[int], None]) -> Iterator[None]:
        with self._lock:
            check(self.held)
            self.held += 1
        self._local.holding = True
        try:
            yield
        finally:
            with self._lock:
                self.release()

    def holding(self) -> bool:
        return getattr(self._local, "holding", False)

    def release(self) -> None:
        """Give up this thread's place (the caller holds the backend's lock)."""
        if self.holding():
            self._local.holding = False
            self.held -= 1


class Component(str, Enum):
    """The state of one background loop."""

    RUNNING = "running"
    DONE = "done"  # finished its work (the model loader)
    RESTARTING = "restarting"
    FAILED = "failed"  # died too often, or cannot be restarted
    STOPPED = "stopped"


@dataclass
class Health:
    """What `/health` answers: a status, 200 only for "ok", and details with no paths, hosts or reprs."""

    status: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def body(self) -> dict[str, Any]:
        return {"status": self.status, **self.details}


def derive_status(*, draining: bool, model: ModelState, components: dict[str, Component]) -> str:
    """One rule for every process: draining, then a dead part, then the model's state."""
    if draining:
        return "draining"
    if any(state is Component.FAILED for state in components.values()):
        return "unhealthy"
    if model is ModelState.FAILED:
        return "failed"
    if model is ModelState.LOADING:
        return "loading"
    if model is ModelState.WARMING_UP:
        return "warming_up"
    return "ok"


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
