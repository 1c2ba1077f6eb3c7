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

from config import Settings
from video_diffusion.clock import Clock
from video_diffusion import errors
from video_diffusion.backends.contract import Health, Places, component_states, derive_status
from video_diffusion.backends.disk_store import DiskStore
from video_diffusion.backends.shared import answer_from_cache, load_model
from video_diffusion.backends.storage import CHECK_SECONDS, Storage, files_estimate
from video_diffusion.backends.supervisor import Supervisor
from video_diffusion.models.contract import ModelInfo
from video_diffusion.delivery.webhooks import Dispatcher, FileOutbox
from video_diffusion.errors import StorageFull
from video_diffusion.lifecycle.idempotency import FileStore
from video_diffusion.lifecycle.recipe import execute, progress_recorder
from video_diffusion.lifecycle.record import (
    ModelState,
    Task,
    TaskStatus,
    admit,
    cacheable,
    failure,
    queue_timed_out,
    record_expires_at,
    result_expired,
    result_expires_at,
)

log = logging.getLogger(__name__)

RETRY_SAVE_SECONDS = 5.0
KEY_SWEEP_SECONDS = 60.0  # how often the janitor deletes Idempotency-Keys past RESULT_TTL


class EmbeddedBackend:
    """Tasks on disk under VIDEO_OUTPUT_PATH, run by one thread of this process."""

    def __init__(self, settings: Settings, store: DiskStore, load: Callable, telemetry, clock: Clock | None = None):
        self.settings = settings
        self.clock = clock or Clock()
        self.store = store
        self._load = load
        self.telemetry = telemetry
        self.supervisor = Supervisor()
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        # Tasks whose latest state is only in memory: queued, running, or ended with the record not yet on disk.
        self._live: dict[str, Task] = {}
        self._cancel_requested: dict[str, type] = {}  # task id -> why (errors.TaskCanceled, errors.ClientGone)
        self._save_failed: set[str] = set()  # ended tasks whose record could not be written: the janitor retries
        self._places = Places(self._cond)  # held by admitted requests still being read and decoded
        self._running: Task | None = None
        self._draining = False
        self._keys_swept_at = time.monotonic()
        self._expiries: list[tuple[float, str, str]] = []  # heap of (when, "result" | "record", task id)
        self._cache: dict[str, str] = {}  # result cache: a request's cache key -> the task that made its video
        self.outbox = self.dispatcher = self.idempotency = None  # set by start(), once the folder is ours
        self.storage = Storage(store, max_bytes=settings.max_storage_mb and settings.max_storage_mb * 2**20,
                               min_free_bytes=settings.min_free_disk_mb * 2**20)
        self.generator = None
        self.model_state = ModelState.LOADING
        self.model_error: str | None = None  # curated: safe to show to clients

    def start(self) -> None:
        self.store.lock()
        self.outbox = FileOutbox(self.store.root / ".webhooks")
        self.idempotency = FileStore(self.store.root / ".idempotency", self.clock)
        self.dispatcher = Dispatcher.for_settings(self.outbox, self.settings, self.telemetry, self.clock)
        self._recover()
        self.storage.check()
        self.supervisor.spawn("storage", self._storage_loop)
        self.supervisor.spawn("model", self._load_model, forever=False)
        self.supervisor.spawn("runner", self._run_loop, on_crash=self._runner_crashed)
        self.supervisor.spawn("janitor", self._janitor_loop)
        self.supervisor.spawn("webhooks", lambda: self.dispatcher.run(self.supervisor.stopping))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking tasks, cancel the running one at its next step and wait for the loops to end."""
        with self._cond:
            self.supervisor.stopping.set()
            if self._running is not None:
                self._cancel_requested[self._running.task_id] = errors.TaskCanceled
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
            for task in self._waiting_sync():
                self._end(task, TaskStatus.CANCELED, failure(errors.ShuttingDown))
            self._cond.wait_for(lambda: self._running is None or not self.supervisor.alive("runner"), timeout)

    def interrupt(self) -> None:
        """Stop now (a second Ctrl-C, the process exits next): the running task and the synchronous ones waiting
        end `interrupted`, written down; queued async tasks stay for the next start."""
        with self._cond:
            ending = [t for t in (self._running, *self._waiting_sync()) if t is not None]
        for task in ending:
            self._end(task, TaskStatus.FAILED, failure(errors.Interrupted))

    def _waiting_sync(self) -> list[Task]:
        """The queued tasks a synchronous client waits for (the caller holds the lock)."""
        return [self._live[t] for t in self._queue if self._live[t].mode == "sync"]

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
                    self.storage.reserve(task.task_id, files_estimate(task))  # its input is on disk already
                elif not task.status.terminal:
                    self._live[task.task_id] = task
                    self._end(task, TaskStatus.FAILED, failure(errors.Interrupted))
                else:
                    self._schedule_expiry(task)
                    self._remember(task)
        if self._queue:
            log.info("recovered %d queued task(s)", len(self._queue))

    def _load_model(self) -> None:
        load_model(self._load, self.settings, self._publish_model)

    def _publish_model(self, state: ModelState, generator, error: str | None) -> None:
        with self._cond:
            self.generator, self.model_state, self.model_error = generator, state, error
            self._cond.notify_all()

    # --- submitting and reading -------------------------------------------------------------------

    def _storage_loop(self) -> None:
        while not self.supervisor.stopping.wait(CHECK_SECONDS):
            self.storage.check()

    def admission(self, mode: str):
        def check(held: int) -> None:
            admit(mode, draining=self._draining, model=self.model_state, ready_detail=self.model_error or "",
                  waiting=len(self._queue) + held, max_queue=self.settings.max_queue)
            self.storage.admit(0)  # a full or unusable folder refuses before the body is read

        return self._places.hold(check)

    def submit(self, task: Task, image) -> Task:
        """Put `task` in line: on disk (input, then record) before it is accepted. A repeat of a request whose
        video is still kept is answered from it: a finished task at once. Runs inside `admission()`."""
        if not self._places.holding():
            raise RuntimeError("submit() runs inside admission(), which holds the task's place in line")
        if task.cache_key and (hit := self._answer_from_cache(task)) is not None:
            return hit
        estimate = files_estimate(task, image)
        with self._cond:  # checked and reserved together: what is admitted at once never stores past the budget
            self.storage.admit(estimate)
            self.storage.reserve(task.task_id, estimate)
        try:
            self.store.write_input(task, image)
            with self._cond:
                task.created_at = self.clock.now()  # arrival is joining the line: timestamps follow the line's order
                self.store.save(task)
                self._queue.append(task.task_id)
                self._places.release()  # the line counts it now
                self._live[task.task_id] = task
                accepted = copy.deepcopy(task)  # as accepted: the runner may start it once the lock is free
                self._cond.notify_all()
        except OSError:
            log.exception("task %s: could not store the upload", task.task_id)
            self.store.delete(task.task_id)
            self.storage.settle(task.task_id)
            self.storage.check()
            raise StorageFull("the server could not store the upload (disk full?); try again later",
                              retry_after=60) from None
        self.telemetry.task_created(accepted)
        return accepted

    def _answer_from_cache(self, task: Task) -> Task | None:
        with self._cond:
            original = self._cache.get(task.cache_key)
        return answer_from_cache(self.get(original) if original else None, task, self.settings.result_ttl,
                                 self._keep_hit, self.dispatcher, self.telemetry, self.clock.now())

    def _keep_hit(self, hit: Task) -> bool:
        try:
            self.store.save(hit)
        except OSError:
            log.exception("task %s: could not store a cache hit's record; generating instead", hit.task_id)
            self.store.delete(hit.task_id)
            return False
        with self._cond:
            self._places.release()
            self._schedule_expiry(hit)
        return True

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
            if result_expired(task, self.settings.result_ttl, self.clock.now()):  # due before the janitor's next round
                self._expire("result", task_id)
                task.expired = True
        return task

    def result(self, task: Task) -> BinaryIO | None:
        return None if task.expired else self.store.open_result(task)

    def result_url(self, task: Task) -> str | None:
        """The embedded mode serves every video itself."""
        return None

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

    def cancel(self, task_id: str, reason: type = errors.TaskCanceled) -> Task | None:
        """A queued task ends `canceled` now; a running one at its next denoising step. `reason`: the error whose
        code and message the task ends with (a DELETE, or a client that went away)."""
        with self._cond:
            task = self._live.get(task_id)
            if task is None or task.status.terminal:
                return self.get(task_id)
            if task.status is TaskStatus.QUEUED:
                self._end(task, TaskStatus.CANCELED, failure(reason))
            else:
                self._cancel_requested[task_id] = reason
            return copy.deepcopy(task)

    def _fail_timed_out(self) -> None:
        """Fail tasks that waited longer than QUEUE_TIMEOUT (the caller holds the lock): they never run."""
        now = self.clock.now()
        for task_id in [t for t in self._queue if queue_timed_out(self._live[t], self.settings.queue_timeout, now)]:
            self._end(self._live[task_id], TaskStatus.FAILED, failure(errors.QueueTimeout))

    def served_models(self) -> dict[str, ModelInfo]:
        generator = self.generator
        return {generator.model.name: generator.model} if generator is not None else {}

    def metrics(self) -> dict:
        with self._cond:
            state = {"queue_depth": len(self._queue), "tasks_running": int(self._running is not None),
                     "model_ready": int(self.model_state is ModelState.READY)}
        if self.outbox is not None:
            state["webhooks_pending"] = self.outbox.pending()
        state.update(storage_stored_bytes=self.storage.used, storage_reserved_bytes=self.storage.reserved())
        if self.storage.free is not None:
            state["storage_free_bytes"] = self.storage.free
        if self.generator is not None:
            state.update(self.generator.memory_stats())
        return state

    def health(self) -> Health:
        components = self.supervisor.states()
        with self._cond:
            status = derive_status(draining=self._draining, model=self.model_state, components=components,
                                   storage=self.storage.state)
            details = {"waiting": len(self._queue), "running": int(self._running is not None),
                       "components": component_states(components, self.dispatcher),
                       "storage": self.storage.public()}
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
                    task.start(self.clock.now())
                    self._running = task
                    return task
                self._cond.wait(timeout=1.0)  # wakes to fail overdue tasks even when nothing else happens

    def _run_one(self, task: Task) -> None:
        """Run one task inside a guard: whatever fails ends this task, never the runner."""
        try:
            self.store.save(task)
            self.telemetry.task_started(task)
            self.dispatcher.notify(task)
            progress = progress_recorder(task, self.settings.job_timeout, self._record_progress,
                                         lambda: self._cancel_requested.get(task.task_id))
            status, error = execute(self.generator, task, lambda: self.store.load_image(task.task_id),
                                    self.store.result_path(task), progress)
        except OSError:
            log.exception("task %s: its record could not be saved", task.task_id)
            status, error = TaskStatus.FAILED, failure(errors.StorageFull)
        if error is not None and error["code"] == errors.StorageFull.code:
            self.storage.check()  # now, not at the next round: /health says what the disk did
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
            self._end(task, TaskStatus.FAILED, failure(errors.ServiceError))

    def _end(self, task: Task, status: TaskStatus, error: dict | None) -> None:
        """Record the end of `task` once, wake whoever waits for it, then write it down."""
        with self._cond:
            if task.status.terminal:
                return
            task.finish(status, error, self.clock.now())
            self._remember(task)
            if task.task_id in self._queue:
                self._queue.remove(task.task_id)
            self._cancel_requested.pop(task.task_id, None)
            self._cond.notify_all()
        self.telemetry.task_ended(task)
        self._save_quietly(task)
        self.storage.settle(task.task_id, self.store.root / task.task_id)
        with self._cond:
            if self._running is task:  # only now: a drain that waits for the running task waits for its record
                self._running = None
                self._cond.notify_all()

    def _save_quietly(self, task: Task) -> None:
        """Write an ended task down; on a disk error keep it in memory (the janitor retries) rather than fail."""
        try:
            self.store.delete_input(task)
            self.dispatcher.notify(task)  # before the record: a crash in between leaves a delivery, never a lost one
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
                now = self.clock.now()
                next_due = self._expiries[0][0] if self._expiries else now + 60
                unsaved = [self._live[t] for t in self._save_failed if t in self._live]
                wait = min(max(0.05, next_due - now), RETRY_SAVE_SECONDS if unsaved else 60.0, KEY_SWEEP_SECONDS)
                self._cond.wait(wait)
                if self.supervisor.stopping.is_set():
                    return
                due = []
                while self._expiries and self._expiries[0][0] <= self.clock.now():
                    due.append(heapq.heappop(self._expiries))
            for task in unsaved:
                self._save_quietly(task)
            for _, kind, task_id in due:
                self._expire(kind, task_id)
            if time.monotonic() - self._keys_swept_at >= KEY_SWEEP_SECONDS:  # Idempotency-Keys past RESULT_TTL
                self._keys_swept_at = time.monotonic()
                try:
                    gone = self.idempotency.sweep(self.settings.result_ttl)
                except OSError:
                    log.exception("could not sweep the expired Idempotency-Keys; trying again later")
                else:
                    if gone:
                        log.info("deleted %d expired Idempotency-Key(s)", gone)

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
