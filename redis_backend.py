"""The scale-out backend: tasks in Redis, run by RQ workers (`python worker.py`) that hold the model.

API and workers share nothing but Redis: task records, input images and finished videos all live there,
each with its TTL. Keys:

    vd:task:<id>     the task record (JSON), kept RESULT_TTL + a week so expired results answer 410
    vd:input:<id>    the normalised input image (PNG) until the task ends
    vd:result:<id>   the video, for RESULT_TTL
    vd:cancel:<id>   set by DELETE /tasks/<id>; the worker stops at its next step
    vd:worker:<name> a live worker's heartbeat (JSON), expiring after WORKER_TTL
    vd:started       ids of running tasks, checked against the heartbeats to fail abandoned ones
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import redis
from PIL import Image
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue

from config import Settings
from errors import BackendUnavailable, ModelNotReady, QueueFull
from tasks import CANCELED, EXPIRED, Task, TaskStatus, execute, progress_recorder

log = logging.getLogger(__name__)

QUEUE_NAME = "video-diffusion"
TOMBSTONE_SECONDS = 7 * 86400
ABANDONED = {"code": "abandoned",
             "message": "the worker running this task stopped (killed or lost); submit it again"}
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _key(kind: str, name: str) -> str:
    return f"vd:{kind}:{name}"


def connect(url: str, blocking: bool = False) -> redis.Redis:
    """A client that fails fast when Redis is down (a worker's may block longer: it waits on the queue)."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=None if blocking else 3,
                                retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 1), health_check_interval=15)


def _unavailable_on_redis_errors(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"Redis is unreachable ({exc}); try again shortly", retry_after=5) from None

    return wrapper


class RedisBackend:
    """The API side: validates nothing itself (the server did), enqueues, reads and cancels."""

    def __init__(self, settings: Settings, connection: redis.Redis | None = None, *, telemetry):
        self.settings = settings
        self.redis = connection or connect(settings.redis)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.telemetry = telemetry

    def start(self) -> None:
        """Nothing to start: the workers hold the model."""

    def drain(self, timeout: float) -> None:
        """Nothing runs in the API process: gunicorn itself waits for the synchronous requests in flight."""

    def stop(self) -> None:
        self.redis.close()

    # --- records ---------------------------------------------------------------------------------

    def save(self, task: Task) -> None:
        self.redis.set(_key("task", task.task_id), task.to_json(), ex=self.settings.result_ttl + TOMBSTONE_SECONDS)

    def load(self, task_id: str) -> Task | None:
        data = self.redis.get(_key("task", task_id))
        return None if data is None else Task.from_json(data)

    def end(self, task: Task, status: TaskStatus, error: dict | None) -> None:
        task.finish(status, error)
        self.save(task)
        self.redis.srem("vd:started", task.task_id)
        self.redis.delete(_key("input", task.task_id))
        self.telemetry.task_ended(task)

    def overdue(self, task: Task) -> bool:
        return task.status is TaskStatus.QUEUED and time.time() - task.created_at > self.settings.queue_timeout

    # --- the backend interface the server uses --------------------------------------------------------

    @_unavailable_on_redis_errors
    def submit(self, task: Task, image: Image.Image) -> Task:
        if task.mode == "sync" and not any(w["state"] == "ready" for w in self.workers()):
            raise ModelNotReady("no worker is ready to run it (start `python worker.py`)", retry_after=10)
        waiting = self.queue.count
        if waiting >= self.settings.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting (MAX_QUEUE={self.settings.max_queue}); "
                            "try again later", retry_after=30)
        png = io.BytesIO()
        image.save(png, format="PNG", compress_level=1)
        self.redis.set(_key("input", task.task_id), png.getvalue(), ex=self.settings.result_ttl)
        self.save(task)
        # RQ's own timeout is a backstop behind the per-step JOB_TIMEOUT check, which fails cleanly.
        self.queue.enqueue_call("redis_backend.run_job", args=(task.task_id,), job_id=task.task_id,
                                timeout=self.settings.job_timeout + 60, result_ttl=0,
                                failure_ttl=self.settings.result_ttl)
        self.telemetry.task_created(task)
        return task

    @_unavailable_on_redis_errors
    def get(self, task_id: str) -> Task | None:
        task = self.load(task_id)
        if task is None:
            return None
        self._fail_if_abandoned(task)
        if self.overdue(task) and self.queue.remove(task_id):  # LREM: only if no worker took it meanwhile
            self.end(task, TaskStatus.FAILED, EXPIRED)
        if task.status is TaskStatus.FINISHED and time.time() >= task.finished_at + self.settings.result_ttl:
            task.expired = True
        return task

    @_unavailable_on_redis_errors
    def result(self, task: Task) -> bytes | None:
        return self.redis.get(_key("result", task.task_id))

    @_unavailable_on_redis_errors
    def queue_position(self, task_id: str) -> int | None:
        position = self.queue.get_job_position(task_id)
        return None if position is None else position + 1

    def wait(self, task_id: str, timeout: float) -> Task | None:
        deadline = time.monotonic() + timeout
        while True:
            task = self.get(task_id)
            if task is None or task.status.terminal or time.monotonic() >= deadline:
                return task
            time.sleep(0.1)

    @_unavailable_on_redis_errors
    def cancel(self, task_id: str) -> Task | None:
        """A queued task still in the RQ queue ends now; otherwise its worker stops it at the next step."""
        task = self.get(task_id)
        if task is None or task.status.terminal:
            return task
        if task.status is TaskStatus.QUEUED and self.queue.remove(task_id):  # LREM: the worker can't have it
            job = self.queue.fetch_job(task_id)
            if job is not None:
                job.delete(remove_from_queue=False)
            self.end(task, TaskStatus.CANCELED, CANCELED)
            return task
        self.redis.set(_key("cancel", task_id), "1", ex=self.settings.job_timeout + 120)
        return task

    def metrics_state(self) -> dict:
        try:
            workers, waiting = self.workers(), self.queue.count
        except REDIS_ERRORS:
            return {"model_ready": 0}
        ready = [w for w in workers if w["state"] == "ready"]
        return {"queue_depth": waiting, "workers_live": len(workers), "model_ready": int(bool(ready)),
                "tasks_running": sum(1 for w in workers if w.get("task"))}

    def workers(self) -> list[dict]:
        names = list(self.redis.scan_iter(match=_key("worker", "*"), count=100))
        return [json.loads(v) for v in self.redis.mget(names) if v] if names else []

    def health(self) -> dict:
        try:
            self.reap_abandoned()
            workers, waiting = self.workers(), self.queue.count
        except REDIS_ERRORS as exc:
            return {"status": "unavailable", "mode": "redis", "redis": f"unreachable: {exc}"}
        ready = [w for w in workers if w["state"] == "ready"]
        info = {"status": "ok" if ready else "no_workers", "mode": "redis", "redis": "ok", "workers": len(ready),
                "workers_not_ready": len(workers) - len(ready), "waiting": waiting,
                "running": sum(1 for w in workers if w.get("task"))}
        if ready:
            info.update({k: ready[0][k] for k in ("model", "noise", "device", "dtype")})
        return info

    def reap_abandoned(self) -> None:
        """Fail started tasks whose worker's heartbeat has expired (it was killed or lost Redis)."""
        for task_id in self.redis.smembers("vd:started"):
            task = self.load(task_id.decode())
            if task is None:
                self.redis.srem("vd:started", task_id)
            else:
                self._fail_if_abandoned(task)

    def _fail_if_abandoned(self, task: Task) -> None:
        if task.status is TaskStatus.STARTED and not self.redis.exists(_key("worker", task.worker)):
            log.warning("task %s: its worker %s is gone; failing it as abandoned", task.task_id, task.worker)
            self.end(task, TaskStatus.FAILED, ABANDONED)


class WorkerRuntime:
    """The worker side: one per `worker.py` process, holding the pipeline the RQ jobs run on."""

    def __init__(self, settings: Settings, telemetry):
        self.settings = settings
        self.backend = RedisBackend(settings, connect(settings.redis), telemetry=telemetry)
        self.telemetry = telemetry
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.state, self.error, self.generator, self.current = "loading", None, None, None
        self._stop = threading.Event()

    def load(self, load_generator) -> None:
        try:
            self.generator = load_generator(self.settings)
            self.state = "ready"
        except Exception as exc:  # noqa: BLE001 - stay up and say why, rather than crash-loop
            log.exception("the model failed to load")
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
        self.beat()

    def metrics_state(self) -> dict:
        state = {"tasks_running": int(self.current is not None), "model_ready": int(self.state == "ready")}
        if self.generator is not None:
            state.update(self.generator.memory_stats())
        return state

    def beat(self) -> None:
        info = {"name": self.name, "state": self.state, "task": self.current, "error": self.error}
        if self.generator is not None:
            info.update(self.generator.describe())
        self.backend.redis.set(_key("worker", self.name), json.dumps(info), ex=self.settings.worker_ttl)

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.settings.worker_ttl / 3):
            try:
                self.beat()
                self.backend.reap_abandoned()
            except REDIS_ERRORS as exc:
                log.warning("heartbeat: Redis unreachable (%s); retrying", exc)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.backend.redis.delete(_key("worker", self.name))
        except REDIS_ERRORS:
            pass

    def run(self, task_id: str) -> None:
        backend = self.backend
        task = backend.load(task_id)
        if task is None or task.status.terminal:
            return
        if backend.redis.exists(_key("cancel", task_id)):
            backend.end(task, TaskStatus.CANCELED, CANCELED)
            return
        if backend.overdue(task):
            backend.end(task, TaskStatus.FAILED, EXPIRED)
            return
        task.start(worker=self.name)
        backend.save(task)
        self.telemetry.task_started(task)
        backend.redis.sadd("vd:started", task_id)
        self.current = task_id
        self.beat()
        try:
            def load_image() -> Image.Image:
                return Image.open(io.BytesIO(backend.redis.get(_key("input", task_id)))).convert("RGB")

            progress = progress_recorder(task, self.settings.job_timeout, backend.save,
                                         lambda: bool(backend.redis.exists(_key("cancel", task_id))))
            with tempfile.TemporaryDirectory(prefix="vd-") as folder:
                out = Path(folder) / "video"
                status, error = execute(self.generator, task, load_image, out, progress)
                if status is TaskStatus.FINISHED:
                    backend.redis.set(_key("result", task_id), out.read_bytes(), ex=self.settings.result_ttl)
            backend.end(task, status, error)
        finally:
            self.current = None
            self.beat()


_runtime: WorkerRuntime | None = None  # set once by worker.py in a worker process


def install_runtime(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def run_job(task_id: str) -> None:
    """The RQ job: run one task on this worker process's pipeline."""
    if _runtime is None or _runtime.state != "ready":
        raise RuntimeError("run_job runs inside `python worker.py`, after the model has loaded")
    _runtime.run(task_id)
