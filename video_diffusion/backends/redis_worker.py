"""The worker side of a Redis deployment: one per `worker.py` process, holding the pipeline the RQ jobs run on."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path

from PIL import Image

from config import Settings
from video_diffusion.clock import Clock
from video_diffusion import errors
from video_diffusion.backends import blobs
from video_diffusion.backends.blobs import BlobStoreError, result_name
from video_diffusion.backends.redis_store import REDIS_ERRORS, RedisOutbox, RedisStore, connect, redis_key
from video_diffusion.backends.shared import load_model
from video_diffusion.backends.supervisor import Supervisor
from video_diffusion.delivery.webhooks import Dispatcher
from video_diffusion.errors import ServiceError
from video_diffusion.lifecycle.recipe import execute, progress_recorder
from video_diffusion.lifecycle.record import (
    ModelState,
    Task,
    TaskStatus,
    cacheable,
    failure,
    queue_timed_out,
    result_expires_at,
)

log = logging.getLogger(__name__)


class TaskLost(ServiceError):
    """This worker's task was ended elsewhere (reaped as abandoned): stop working on it."""

    status, code = 409, "abandoned"


class WorkerRuntime:
    """The worker side: one per `worker.py` process, holding the pipeline the RQ jobs run on."""

    def __init__(self, settings: Settings, telemetry, clock: Clock | None = None):
        self.settings = settings
        self.clock = clock or Clock()
        self.redis = connect(settings.redis)
        self.blobs = blobs.for_settings(settings)
        self.store = RedisStore(self.redis, settings, self.clock, self.blobs)
        self.telemetry = telemetry
        # Unique per start: a worker restarted with the same pid (PID 1 in a container) is a new worker.
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.metrics_server = None  # its /metrics (worker_metrics.serve), named in the heartbeat
        self.state, self.error, self.generator, self.current = ModelState.LOADING, None, None, None
        self.rq_worker: str | None = None  # the RQ worker taking jobs for this runtime: the name RQ puts on its jobs
        self.supervisor = Supervisor()
        self.dispatcher = Dispatcher.for_settings(RedisOutbox(self.redis), settings, telemetry, self.clock)

    def load(self, load_generator) -> None:
        load_model(load_generator, self.settings, self._publish_model)

    def _publish_model(self, state: ModelState, generator, error: str | None) -> None:
        self.state, self.generator, self.error = state, generator, error
        self._beat_quietly()

    def metrics(self) -> dict:
        state = {"tasks_running": int(self.current is not None), "model_ready": int(self.state is ModelState.READY)}
        if self.generator is not None:
            state.update(self.generator.memory_stats())
        return state

    def beat(self) -> None:
        info = {"name": self.name, "state": self.state.value, "task": self.current, "error": self.error,
                "rq_worker": self.rq_worker,
                "metrics_port": self.metrics_server.server_port if self.metrics_server is not None else None}
        if self.generator is not None:
            info.update(self.generator.describe(), served=self.generator.model.public())
        self.redis.set(redis_key("worker", self.name), json.dumps(info), ex=self.settings.worker_ttl)

    def _beat_quietly(self) -> None:
        try:
            self.beat()
        except REDIS_ERRORS as exc:
            log.warning("heartbeat: Redis unreachable (%s); retrying", exc)

    def serve_metrics(self, server) -> None:
        """Serve `server` (bound, not yet serving) as a supervised loop until `stop`."""
        self.metrics_server = server
        self.supervisor.spawn("metrics", server.serve_forever)

    def start_heartbeat(self) -> None:
        self.supervisor.spawn("heartbeat", self._heartbeat_loop)
        self.supervisor.spawn("webhooks", lambda: self.dispatcher.run(self.supervisor.stopping))
        self.supervisor.spawn("redis-watch", lambda: self.store.watch(self.supervisor.stopping))  # for its reaping

    def _heartbeat_loop(self) -> None:
        while not self.supervisor.stopping.wait(self.settings.worker_ttl / 3):
            self._beat_quietly()
            try:
                self.store.reap()
            except REDIS_ERRORS:
                pass  # said by the beat above

    def stop(self) -> None:
        self.supervisor.stopping.set()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()  # serve_forever returns
        self.supervisor.stop(5)
        self.dispatcher.stop()
        try:
            self.redis.delete(redis_key("worker", self.name))
        except REDIS_ERRORS:
            pass

    def run(self, task_id: str) -> None:
        store = self.store
        task = store.load(task_id)
        if task is None or task.status.terminal:
            return
        reason = self._cancel_requested(task_id)
        if reason is not None:
            self._end_unstarted(task, TaskStatus.CANCELED, failure(reason))
            return
        if queue_timed_out(task, self.settings.queue_timeout, self.clock.now()):
            self._end_unstarted(task, TaskStatus.FAILED, failure(errors.QueueTimeout))
            return
        self.current = task_id
        self.beat()  # the heartbeat names the task before the record does: the reaper never sees it unowned
        try:
            task.start(self.clock.now(), worker=self.name)
            if not store.compare_and_set(task, expected=[TaskStatus.QUEUED]):
                return  # canceled, failed or claimed in between
            self.telemetry.task_started(task)
            status, error, video = self._execute(task)
            if self._end_retrying(task, status, error, video):
                self.telemetry.task_ended(task)
                self._remember(task)
        finally:
            self.current = None
            self._beat_quietly()

    def _remember(self, task: Task) -> None:
        """Index a finished task's video for repeats of its request, for as long as the video is kept."""
        if not cacheable(task):
            return
        try:
            self.redis.set(redis_key("cache", task.cache_key), task.task_id,
                           exat=int(result_expires_at(task, self.settings.result_ttl)))
        except REDIS_ERRORS as exc:  # repeats will generate again: slower, never wrong
            log.warning("task %s: not indexed for repeats, Redis unreachable (%s)", task.task_id, exc)

    def _end_unstarted(self, task: Task, status: TaskStatus, error: dict) -> None:
        if self.store.end(task, status, error):
            self.telemetry.task_ended(task)

    def _execute(self, task: Task) -> tuple[TaskStatus, dict | None, bytes]:
        def load_image() -> Image.Image:
            try:
                data = self.store.read_input(task.task_id)
            except BlobStoreError as exc:
                raise errors.StorageFull(str(exc)) from None
            if data is None:
                raise FileNotFoundError("the task's input is gone from the result store")
            return Image.open(io.BytesIO(data)).convert("RGB")

        progress = progress_recorder(task, self.settings.job_timeout, self._save_progress,
                                     lambda: self._cancel_requested(task.task_id))
        with tempfile.TemporaryDirectory(prefix="vd-") as folder:
            out = Path(folder) / "video"
            status, error = execute(self.generator, task, load_image, out, progress)
            if status is not TaskStatus.FINISHED:
                return status, error, b""
            if self.blobs is None:  # the transition stores it in Redis with the record
                return status, error, out.read_bytes()
            try:  # streamed from the file; stored before the record says finished, so a reader always finds it
                with open(out, "rb") as video:
                    self.blobs.put(result_name(task.task_id), video)
            except BlobStoreError as exc:
                task.result = None  # no video to describe: it is nowhere a reader could find it
                return TaskStatus.FAILED, {"code": errors.StorageFull.code, "message": str(exc)}, b""
        return status, error, b""

    def _save_progress(self, task: Task) -> None:
        """Progress is best effort through a Redis outage; a task taken away (reaped) stops the run."""
        try:
            moved = self.store.compare_and_set(task, worker=self.name)
        except REDIS_ERRORS as exc:
            log.warning("task %s: progress not saved, Redis unreachable (%s)", task.task_id, exc)
            return
        if not moved:
            raise TaskLost("this task was ended elsewhere")

    def _cancel_requested(self, task_id: str) -> type | None:
        """Why the task was canceled (the cancel key holds the error's code; "1" from an older API), or None."""
        try:
            code = self.redis.get(redis_key("cancel", task_id))
        except REDIS_ERRORS:
            return None
        if code is None:
            return None
        reason = errors.BY_CODE.get(code.decode(errors="replace"), errors.TaskCanceled)
        return reason if issubclass(reason, errors.TaskCanceled) else errors.TaskCanceled

    def _end_retrying(self, task: Task, status: TaskStatus, error: dict | None, video: bytes) -> bool:
        """Save the end, retrying through a Redis outage (up to JOB_TIMEOUT): a task never stays `started`."""
        delay, deadline = 0.2, time.monotonic() + self.settings.job_timeout
        while True:
            try:
                ended = self.store.end(task, status, error, worker=self.name, result=video)
                if not ended:
                    log.warning("task %s ended elsewhere (%s); dropping this worker's result", task.task_id,
                                (self.store.load(task.task_id) or task).status.value)
                    if self.blobs is not None and status is TaskStatus.FINISHED:
                        self.blobs.delete(result_name(task.task_id))
                return ended
            except REDIS_ERRORS as exc:
                if time.monotonic() > deadline:
                    log.error("task %s: could not save its end: Redis unreachable for too long", task.task_id)
                    return False
                log.warning("task %s: saving its end failed, Redis unreachable (%s); retrying", task.task_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


_runtime: WorkerRuntime | None = None  # set once by worker.py in a worker process


def install_runtime(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def run_job(task_id: str) -> None:
    """The RQ job: run one task on this worker process's pipeline."""
    if _runtime is None or _runtime.state is not ModelState.READY:
        raise RuntimeError("run_job runs inside `python worker.py`, after the model has loaded")
    _runtime.run(task_id)
