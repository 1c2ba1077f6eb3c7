"""The single-process backend: loads the model in the background and runs tasks one at a time, in order."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from typing import Callable

from config import Settings
from errors import ModelNotReady, QueueFull, ShuttingDown
from tasks import CANCELED, EXPIRED, SHUTTING_DOWN, Task, TaskStatus, TaskStore, execute, progress_recorder

log = logging.getLogger(__name__)

INTERRUPTED = {"code": "interrupted", "message": "the service stopped while this task was running; submit it again"}


class EmbeddedBackend:
    """Tasks on disk under VIDEO_OUTPUT_PATH, run by one thread of this process."""

    def __init__(self, settings: Settings, store: TaskStore, load: Callable, telemetry):
        self.settings = settings
        self.store = store
        self._load = load
        self.telemetry = telemetry
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._active: dict[str, Task] = {}  # queued and started tasks, by id
        self._cancel_requested: set[str] = set()
        self._reserved = 0  # places taken by submissions still writing to disk
        self._running: Task | None = None
        self._stopping = False
        self._draining = False
        self.generator = None
        self.model_state = "loading"  # loading, ready, failed
        self.model_error: str | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._recover()
        self._threads = [threading.Thread(target=target, name=name, daemon=True) for target, name in
                         ((self._load_model, "model-loader"), (self._run, "task-runner"),
                          (self._sweep, "result-janitor"))]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking tasks, cancel the running one at its next step and wait for the threads to end."""
        with self._cond:
            self._stopping = True
            if self._running is not None:
                self._cancel_requested.add(self._running.task_id)
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def drain(self, timeout: float) -> None:
        """Start nothing new; waiting synchronous requests get 503; wait for the running task to end.

        Queued async tasks stay on disk and run after the next start.
        """
        with self._cond:
            self._draining = True
            for task_id in [t for t in self._queue if self._active[t].mode == "sync"]:
                self._queue.remove(task_id)
                self._end(self._active[task_id], TaskStatus.CANCELED, SHUTTING_DOWN)
            self._cond.wait_for(lambda: self._running is None, timeout)

    def _recover(self) -> None:
        """After a restart: queued async tasks run again; a task that was running ends `interrupted`.

        A synchronous task's client is gone with the old process and never learned the id, so its task
        ends `interrupted` too rather than spend the GPU on a video nobody will fetch.
        """
        for task in self.store.all_tasks():
            if task.status is TaskStatus.QUEUED and task.mode == "async":
                self._queue.append(task.task_id)
                self._active[task.task_id] = task
            elif not task.status.terminal:
                task.finish(TaskStatus.FAILED, INTERRUPTED)
                self.store.save(task)
        if self._queue:
            log.info("recovered %d queued task(s) from %s", len(self._queue), self.store.root)

    def _load_model(self) -> None:
        try:
            generator = self._load(self.settings)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the process up and says why
            log.exception("the model failed to load")
            with self._cond:
                self.model_state, self.model_error = "failed", f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
            return
        with self._cond:
            self.generator, self.model_state = generator, "ready"
            self._cond.notify_all()
        log.info("model ready: %s on %s (%s)", generator.model.label, generator.device, generator.dtype)

    # --- submitting and reading -------------------------------------------------------------------

    def submit(self, task: Task, image) -> Task:
        """Put `task` in line; 503 when the model cannot take it or the line is full."""
        with self._cond:
            self._check_accepting(task)
            self._reserved += 1
        try:
            self.store.create(task, image)
        finally:
            with self._cond:
                self._reserved -= 1
        with self._cond:
            task.created_at = time.time()  # arrival is joining the line: timestamps follow the line's order
            self.store.save(task)
            self._queue.append(task.task_id)
            self._active[task.task_id] = task
            accepted = copy.deepcopy(task)  # as accepted: the runner may start it the moment the lock is free
            self._cond.notify_all()
        self.telemetry.task_created(accepted)
        return accepted

    def _check_accepting(self, task: Task) -> None:
        if self._draining:
            raise ShuttingDown("the service is shutting down; try again shortly", retry_after=10)
        if self.model_state == "failed":
            raise ModelNotReady(f"the model failed to load: {self.model_error}", retry_after=60)
        if self.model_state == "loading" and task.mode == "sync":
            raise ModelNotReady("the model is still loading; try again shortly", retry_after=10)
        waiting = len(self._queue) + self._reserved
        if waiting >= self.settings.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting (MAX_QUEUE={self.settings.max_queue}); "
                            "try again later", retry_after=30)

    def get(self, task_id: str) -> Task | None:
        with self._cond:
            self._expire_overdue()
            if task_id in self._active:
                return copy.deepcopy(self._active[task_id])
        task = self.store.load(task_id)
        if task is not None:
            self._expire_if_due(task)
        return task

    def result(self, task: Task):
        """The finished task's video file (None once expired)."""
        path = self.store.result_path(task)
        return path if path.exists() else None

    def _expire_if_due(self, task: Task) -> None:
        if task.status.terminal and not task.expired and time.time() >= task.finished_at + self.settings.result_ttl:
            self.store.delete_files(task)
            task.expired = True
            self.store.save(task)

    def _sweep(self) -> None:
        """Delete videos older than RESULT_TTL, checking every minute (or sooner for short TTLs)."""
        interval = min(60.0, self.settings.result_ttl / 2)
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, timeout=interval):
                    return
            for task in self.store.all_tasks():
                if task.task_id not in self._active:
                    self._expire_if_due(task)

    def queue_position(self, task_id: str) -> int | None:
        """1 for the task that runs next, None when it is not waiting."""
        with self._cond:
            return self._queue.index(task_id) + 1 if task_id in self._queue else None

    def wait(self, task_id: str, timeout: float) -> Task | None:
        """The task once it has ended, or as it stands when `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while task_id in self._active:
                self._expire_overdue()
                if task_id not in self._active:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return copy.deepcopy(self._active[task_id])
                self._cond.wait(remaining)
        return self.store.load(task_id)

    def cancel(self, task_id: str) -> Task | None:
        """A queued task ends `canceled` now; a running one at its next denoising step."""
        with self._cond:
            task = self._active.get(task_id)
            if task is None:
                return self.store.load(task_id)
            if task.status is TaskStatus.QUEUED:
                self._queue.remove(task_id)
                self._end(task, TaskStatus.CANCELED, CANCELED)
            else:
                self._cancel_requested.add(task_id)
            return copy.deepcopy(task)

    def _expire_overdue(self) -> None:
        """Fail tasks that waited longer than QUEUE_TIMEOUT (the caller holds the lock): they never run."""
        now = time.time()
        for task_id in [t for t in self._queue if now - self._active[t].created_at > self.settings.queue_timeout]:
            self._queue.remove(task_id)
            self._end(self._active[task_id], TaskStatus.FAILED, EXPIRED)

    def metrics_state(self) -> dict:
        with self._cond:
            state = {"queue_depth": len(self._queue), "tasks_running": int(self._running is not None),
                     "model_ready": int(self.model_state == "ready")}
        if self.generator is not None:
            state.update(self.generator.memory_stats())
        return state

    def health(self) -> dict:
        with self._cond:
            info = {"status": {"ready": "ok"}.get(self.model_state, self.model_state),
                    "waiting": len(self._queue), "running": int(self._running is not None)}
            if self.generator is not None:
                info.update(self.generator.describe())
            if self.model_error:
                info["error"] = self.model_error
            return info

    # --- running ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self.model_state != "ready" or not self._queue or self._draining):
                    self._cond.wait(timeout=1.0)  # wakes to expire overdue tasks even when nothing else happens
                    self._expire_overdue()
                if self._stopping:
                    return
                self._expire_overdue()
                if not self._queue:
                    continue
                task = self._active[self._queue.popleft()]
                task.start()
                self._running = task
                self.store.save(task)
            self.telemetry.task_started(task)
            self._execute(task)

    def _execute(self, task: Task) -> None:
        progress = progress_recorder(task, self.settings.job_timeout, self._save,
                                     lambda: task.task_id in self._cancel_requested)
        status, error = execute(self.generator, task, lambda: self.store.load_image(task.task_id),
                                self.store.result_path(task), progress)
        with self._cond:
            self._end(task, status, error)

    def _save(self, task: Task) -> None:
        with self._cond:
            self.store.save(task)

    def _end(self, task: Task, status: TaskStatus, error: dict | None) -> None:
        """Record the end of `task` (the caller holds the lock) and wake whoever waits for it."""
        task.finish(status, error)
        self.store.save(task)
        self._active.pop(task.task_id, None)
        self._cancel_requested.discard(task.task_id)
        if self._running is task:
            self._running = None
        self._cond.notify_all()
        self.telemetry.task_ended(task)
