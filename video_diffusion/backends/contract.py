"""The contract between the HTTP front and where tasks run, and the one rule for what health they report.

`server.py` is typed against `Backend`; `EmbeddedBackend` (one process, tasks on disk) and `RedisBackend`
(tasks in Redis, run by RQ workers) implement it. Health is derived from named component states, so a dead
loop can never hide behind "ok".
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Protocol

from PIL import Image

from video_diffusion.backends.supervisor import Component
from video_diffusion.clock import Clock
from video_diffusion.lifecycle import idempotency
from video_diffusion.lifecycle.record import ModelState, Task
from video_diffusion.models.contract import ModelInfo

log = logging.getLogger(__name__)


class Backend(Protocol):
    idempotency: idempotency.Store  # where Idempotency-Keys are kept (files or Redis)
    clock: Clock  # what the lifecycle's times are read from

    def start(self) -> None: ...

    def served_models(self) -> dict[str, ModelInfo]:
        """The models that run tasks now, by name (the loaded one; in Redis mode, each model a ready worker
        serves): their families, defaults and limits. Empty before one is ready."""

    def stop(self) -> None: ...

    def admission(self, mode: str) -> AbstractContextManager[None]:
        """Hold a place in line while the request is decoded; 503 at once when there is none."""

    def submit(self, task: Task, image: Image.Image) -> Task:
        """Put an admitted task in line and return it as accepted."""

    def get(self, task_id: str) -> Task | None: ...

    def wait(self, task_id: str, timeout: float) -> Task | None: ...

    def cancel(self, task_id: str, reason: type = ...) -> Task | None: ...  # reason: the error it ends with

    def interrupt(self) -> None: ...  # stop now: what runs is recorded interrupted

    def result(self, task: Task) -> BinaryIO | None:
        """The finished task's video as an open binary file, or None once it is gone."""

    def result_url(self, task: Task) -> str | None:
        """Where the client may download the video itself (RESULT_REDIRECT with S3), or None to stream it here."""

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


def component_states(components: dict[str, Component], dispatcher) -> dict[str, str]:
    """The parts' states as /health shows them: the webhook sender "stalled" when it runs but makes no progress."""
    states = {name: state.value for name, state in components.items()}
    if dispatcher is not None and states.get("webhooks") == Component.RUNNING.value and dispatcher.state() == "stalled":
        states["webhooks"] = "stalled"
    return states


def derive_status(*, draining: bool, model: ModelState, components: dict[str, Component],
                  storage: str = "ok") -> str:
    """One rule for every process: draining, then a dead part, then storage (full or unusable), then the model."""
    if draining:
        return "draining"
    if any(state is Component.FAILED for state in components.values()):
        return "unhealthy"
    if storage != "ok":
        return storage
    if model is ModelState.FAILED:
        return "failed"
    if model is ModelState.LOADING:
        return "loading"
    if model is ModelState.WARMING_UP:
        return "warming_up"
    return "ok"


