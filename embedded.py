"""The single-process backend: loads the model in the background and runs tasks one at a time, in order.

Tasks live on disk (store.py) and, while queued or running, in memory. Three supervised loops: the model
loader, the task runner and the janitor (result expiry, record deletion, saves retried after a disk error).
"""

from __future__ import annotations

import copy
import heapq
import logging
import threading
import time
from collections import deque
from typing import BinaryIO, Callable

from backend import Health, Places, Supervisor, derive_status
from config import Settings
from errors import StorageFull
from idempotency import FileStore
from store import TaskStore
from tasks import (ModelState, Task, TaskStatus, admit, cacheable, execute, failure, progress_recorder,
                   queue_timed_out, record_expires_at, result_expired, result_expires_at, reuse)
from webhooks import Dispatcher, FileOutbox, delivery_for, parse_allow

log = logging.getLogger(__name__)

RETRY_SAVE_SECONDS = 5.0


class EmbeddedBackend:
    """Tasks on disk under VIDEO_OUTPUT_PATH, run by one thread of this process."""

    def __init__(self, settings: Settings, store: TaskStore, load: Callable, telemetry):
        self.settings = settings
        self.store = store
        self._load = load
        self.telemetry = telemetry
        self.supervisor = Supervisor()
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        # Tasks whose latest state is only in memory: queued, running, or ended with the record not yet on disk.
        self._live: dict[str, Task] = {}
        self._cancel_requested: set[str] = set()
        self._save_failed: set[str] = set()  # ended tasks whose record could not be written: the janitor retries
        self._places = Places(self._cond)  # held by admitted requests still being read and decoded
        self._running: Task | None = None
        self._draining = False
        self._expiries: list[tuple[float, str, str]] = []  # heap of (when, "result" | "record", task id)
        self._cache: dict[str, str] = {}  # result cache: a request's cache key -> the task that made its video
        self.outbox = self.dispatcher = self.idempotency = None  # set by start(), once the folder is ours
        self.generator = None
        self.model_state = ModelState.LOADING
        self.model_error: str | None = None  # curated: safe to show to clients

    def start(self) -> None:
        self.store.lock()
        self.outbox = FileOutbox(self.store.root / ".webhooks")
        self.idempotency = FileStore(self.store.root / ".idempotency")
        self.dispatcher = Dispatcher(self.outbox, parse_allow(self.settings.webhook_allow or ()),
                                     self.settings.webhook_secret, self.telemetry)
        self._recover()
        self.supervisor.spawn("model", self._load_model, forever=False)
        self.supervisor.spawn("runner", self._run_loop, on_crash=self._runner_crashed)
        self.supervisor.spawn("janitor", self._janitor_loop)
        self.supervisor.spawn("webhooks", lambda: self.dispatcher.run(self.supervisor.stopping))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking tasks, cancel the running one at its next step and wait for the loops to end."""
        with self._cond:
            self.supervisor.stopping.set()
            if self._running is not None:
                self._cancel_requested.add(self._running.task_id)
            self._cond.notify_all()
        self.supervisor.stop(timeout)
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self.store.unlock()

    def drain(self, timeout: float) -> None:
        """Start nothing new; waiting synchronous requests get 503; wait for the running task to end.

        Queued async tasks stay on disk and run after the next start. A dead runner is not waited for.
        """
        with self._cond:
            self._draining = True
            for task_id in [t for t in self._queue if self._live[t].mode == "sync"]:
                self._end(self._live[task_id], TaskStatus.CANCELED, failure("shutting_down"))
            self._cond.wait_for(lambda: self._running is None or not self.supervisor.alive("runner"), timeout)

    def _recover(self) -> None:
        """After a restart: queued async tasks run again; a task that was running ends `interrupted`.

        A synchronous task's client is gone with the old process and never learned the id, so its task
        ends `interrupted` too rather than spend the GPU on a video nobody will fetch.
        """
        with self._cond:
            for task in self.store.all_tasks():
                if task.status is TaskStatus.QUEUED and task.mode == "async":
                    self._queue.append(task.task_id)
                    self._live[task.task_id] = task
                elif not task.status.terminal:
                    self._live[task.task_id] = task
                    self._end(task, TaskStatus.FAILED, failure("interrupted"))
                else:
                    self._schedule_expiry(task)
                    self._remember(task)
        if self._queue:
            log.info("recovered %d queued task(s)", len(self._queue))

    def _load_model(self) -> None:
        try:
            generator = self._load(self.settings)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the process up and says why
            from pipeline import describe_load_failure

            log.exception("the model failed to load")
            with self._cond:
                self.model_state, self.model_error = ModelState.FAILED, describe_load_failure(exc)
                self._cond.notify_all()
            return
        if getattr(generator, "needs_warm_up", False):
            with self._cond:
                self.generator, self.model_state = generator, ModelState.WARMING_UP
            try:
                generator.warm_up()
            except Exception:  # noqa: BLE001 - a failed warm-up only means the first request compiles
                log.exception("the warm-up generation failed; requests will compile on first use")
        with self._cond:
            self.generator, self.model_state = generator, ModelState.READY
            self._cond.notify_all()
        log.info("model ready: %s on %s (%s)", generator.model.label, generator.device, generator.dtype)

    # --- submitting and reading -------------------------------------------------------------------

    def admission(self, mode: str):
        def check(held: int) -> None:
            admit(mode, draining=self._draining, model=self.model_state, ready_detail=self.model_error or "",
                  waiting=len(self._queue) + held, max_queue=self.settings.max_queue)

        return self._places.hold(check)

    def submit(self, task: Task, image) -> Task:
        """Put `task` in line: on disk (input, then record) before it is accepted. A repeat of a request whose
        video is still kept is answered from it: a finished task at once."""
        if not self._places.holding():
            with self.admission(task.mode):
                return self.submit(task, image)
        if task.cache_key and (hit := self._answer_from_cache(task)) is not None:
            return hit
        try:
            self.store.write_input(task, image)
            with self._cond:
                task.created_at = time.time()  # arrival is joining the line: timestamps follow the line's order
                self.store.save(task)
                self._queue.append(task.task_id)
                self._places.release()  # the line counts it now
                self._live[task.task_id] = task
                accepted = copy.deepcopy(task)  # as accepted: the runner may start it once the lock is free
                self._cond.notify_all()
        except OSError:
            log.exception("task %s: could not store the upload", task.task_id)
            self.store.delete(task.task_id)
            raise StorageFull("the server could not store the upload (disk full?); try again later",
                              retry_after=60) from None
        self.telemetry.task_created(accepted)
        return accepted

    def _answer_from_cache(self, task: Task) -> Task | None:
        with self._cond:
            original = self._cache.get(task.cache_key)
        hit = reuse(self.get(original) if original else None, task, self.settings.result_ttl)
        if hit is None:
            return None
        try:
            self.store.save(hit)
        except OSError:
            log.exception("task %s: could not store a cache hit's record; generating instead", task.task_id)
            self.store.delete(task.task_id)
            return None
        with self._cond:
            self._places.release()
            self._schedule_expiry(hit)
        self.telemetry.task_created(hit)
        try:
            self._notify(hit)
        except OSError:
            log.exception("task %s: could not queue its webhook", hit.task_id)
        return hit

    def _notify(self, task: Task) -> None:
        """Queue the webhook delivery the task's new status calls for, if any (OSError when it cannot be kept)."""
        delivery = delivery_for(task)
        if delivery is not None:
            self.outbox.add(delivery)
            self.dispatcher.wake.set()

    def _remember(self, task: Task) -> None:
        """Index a finished task's video for repeats of its request (the caller holds the lock)."""
        if cacheable(task) and not task.expired:
            self._cache[task.cache_key] = task.task_id

    def get(self, task_id: str) -> Task | None:
        with self._cond:
            self._fail_timed_out()
            task = copy.deepcopy(self._live[task_id]) if task_id in self._live else None
        task = task or self.store.load(task_id)
        if task is not None and task.status is TaskStatus.FINISHED and not task.expired:
            if result_expired(task, self.settings.result_ttl):  # due before the janitor's next round
                self._expire("result", task_id)
                task.expired = True
        return task

    def result(self, task: Task) -> BinaryIO | None:
        return None if task.expired else self.store.open_result(task)

    def queue_position(self, task_id: str) -> int | None:
        """1 for the task that runs next, None when it is not waiting."""
        with self._cond:
            return self._queue.index(task_id) + 1 if task_id in self._queue else None

    def wait(self, task_id: str, timeout: float) -> Task | None:
        """The task once it has ended, or as it stands when `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while task_id in self._live and not self._live[task_id].status.terminal:
                self._fail_timed_out()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return self.get(task_id)

    def cancel(self, task_id: str) -> Task | None:
        """A queued task ends `canceled` now; a running one at its next denoising step."""
        with self._cond:
            task = self._live.get(task_id)
            if task is None or task.status.terminal:
                return self.get(task_id)
            if task.status is TaskStatus.QUEUED:
                self._end(task, TaskStatus.CANCELED, failure("canceled"))
            else:
                self._cancel_requested.add(task_id)
            return copy.deepcopy(task)

    def _fail_timed_out(self) -> None:
        """Fail tasks that waited longer than QUEUE_TIMEOUT (the caller holds the lock): they never run."""
        for task_id in [t for t in self._queue if queue_timed_out(self._live[t], self.settings.queue_timeout)]:
            self._end(self._live[task_id], TaskStatus.FAILED, failure("queue_timeout"))

    def model_defaults(self) -> dict | None:
        generator = self.generator
        return dict(generator.model.defaults) if generator is not None else None

    def metrics(self) -> dict:
        with self._cond:
            state = {"queue_depth": len(self._queue), "tasks_running": int(self._running is not None),
                     "model_ready": int(self.model_state is ModelState.READY)}
        if self.generator is not None:
            state.update(self.generator.memory_stats())
        return state

    def health(self) -> Health:
        components = self.supervisor.states()
        with self._cond:
            status = derive_status(draining=self._draining, model=self.model_state, components=components)
            details = {"waiting": len(self._queue), "running": int(self._running is not None),
                       "components": {name: state.value for name, state in components.items()}}
            if self.generator is not None:
                details.update(self.generator.describe())
            if self.model_error:
                details["error"] = {"code": "model_load_failed", "message": self.model_error}
        return Health(status, details)

    # --- running ----------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        while (task := self._next_task()) is not None:
            self._run_one(task)

    def _next_task(self) -> Task | None:
        """The next task to run, marked running; None when the service stops."""
        with self._cond:
            while True:
                self._fail_timed_out()
                if self.supervisor.stopping.is_set():
                    return None
                if self.model_state is ModelState.READY and self._queue and not self._draining:
                    task = self._live[self._queue.popleft()]
                    task.start()
                    self._running = task
                    return task
                self._cond.wait(timeout=1.0)  # wakes to fail overdue tasks even when nothing else happens

    def _run_one(self, task: Task) -> None:
        """Run one task inside a guard: whatever fails ends this task, never the runner."""
        try:
            self.store.save(task)
            self.telemetry.task_started(task)
            self._notify(task)
            progress = progress_recorder(task, self.settings.job_timeout, self._record_progress,
                                         lambda: task.task_id in self._cancel_requested)
            status, error = execute(self.generator, task, lambda: self.store.load_image(task.task_id),
                                    self.store.result_path(task), progress)
        except OSError:
            log.exception("task %s: its record could not be saved", task.task_id)
            status, error = TaskStatus.FAILED, failure("storage_error")
        self._end(task, status, error)

    def _record_progress(self, task: Task) -> None:
        """Progress lives in memory (status reads it there); only state changes go to disk."""
        with self._cond:
            self._cond.notify_all()

    def _runner_crashed(self, exc: BaseException) -> None:
        """The runner loop itself died (not a task): end the task it held so nobody waits for it forever."""
        with self._cond:
            task = self._running
        if task is not None:
            self._end(task, TaskStatus.FAILED, failure("internal_error"))

    def _end(self, task: Task, status: TaskStatus, error: dict | None) -> None:
        """Record the end of `task` once, wake whoever waits for it, then write it down."""
        with self._cond:
            if task.status.terminal:
                return
            task.finish(status, error)
            self._remember(task)
            if task.task_id in self._queue:
                self._queue.remove(task.task_id)
            self._cancel_requested.discard(task.task_id)
            self._cond.notify_all()
        self.telemetry.task_ended(task)
        self._save_quietly(task)
        with self._cond:
            if self._running is task:  # only now: a drain that waits for the running task waits for its record
                self._running = None
                self._cond.notify_all()

    def _save_quietly(self, task: Task) -> None:
        """Write an ended task down; on a disk error keep it in memory (the janitor retries) rather than fail."""
        try:
            self.store.delete_input(task)
            self._notify(task)  # before the record: a crash in between leaves a delivery, never a lost one
            self.store.save(task)
        except OSError:
            log.exception("task %s: could not save its record; keeping it in memory and retrying", task.task_id)
            with self._cond:
                self._save_failed.add(task.task_id)
            return
        with self._cond:
            self._save_failed.discard(task.task_id)
            if self._live.get(task.task_id) is task:
                del self._live[task.task_id]
            self._schedule_expiry(task)

    # --- the janitor ------------------------------------------------------------------------------

    def _schedule_expiry(self, task: Task) -> None:
        ttl = self.settings.result_ttl
        if task.status is TaskStatus.FINISHED and not task.expired:
            heapq.heappush(self._expiries, (result_expires_at(task, ttl), "result", task.task_id))
        if task.finished_at is not None:
            heapq.heappush(self._expiries, (record_expires_at(task, ttl), "record", task.task_id))
        self._cond.notify_all()  # the janitor may be asleep until a later expiry

    def _janitor_loop(self) -> None:
        """Delete videos after RESULT_TTL and records a grace period later; retry saves that failed."""
        while not self.supervisor.stopping.is_set():
            with self._cond:
                next_due = self._expiries[0][0] if self._expiries else time.time() + 60
                unsaved = [self._live[t] for t in self._save_failed if t in self._live]
                wait = min(max(0.05, next_due - time.time()), RETRY_SAVE_SECONDS if unsaved else 60.0)
                self._cond.wait(wait)
                if self.supervisor.stopping.is_set():
                    return
                due = []
                while self._expiries and self._expiries[0][0] <= time.time():
                    due.append(heapq.heappop(self._expiries))
            for task in unsaved:
                self._save_quietly(task)
            for _, kind, task_id in due:
                self._expire(kind, task_id)

    def _expire(self, kind: str, task_id: str) -> None:
        if kind == "record":
            self.store.delete(task_id)
            return
        task = self.store.load(task_id)
        if task is not None and not task.expired:
            with self._cond:
                if task.cache_key and self._cache.get(task.cache_key) == task_id:
                    del self._cache[task.cache_key]
            self.store.delete_files(task)
            task.expired = True
            try:
                self.store.save(task)
            except OSError:  # the files are gone either way; the record's deletion comes later
                log.exception("task %s: could not mark its record expired", task_id)
