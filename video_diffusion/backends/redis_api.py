"""The API side of a Redis deployment: admits, enqueues, reads and cancels tasks; holds no model."""

from __future__ import annotations

import io
import logging
import threading
import time
from typing import BinaryIO

import redis
from PIL import Image
from rq import Queue

from config import Settings
from video_diffusion.clock import Clock
from video_diffusion import errors
from video_diffusion.backends import blobs
from video_diffusion.backends.blobs import BlobStoreError, StoreWatch, input_name, result_name
from video_diffusion.backends.contract import Health, Places, component_states, derive_status
from video_diffusion.backends.redis_store import (
    QUEUE_NAME,
    REDIS_ERRORS,
    TOMBSTONE_SECONDS,
    RedisIdempotency,
    RedisOutbox,
    RedisStore,
    connect,
    redis_key,
    unavailable_on_redis_errors,
)
from video_diffusion.backends.shared import answer_from_cache
from video_diffusion.backends.storage import files_estimate
from video_diffusion.backends.supervisor import Supervisor
from video_diffusion.models.contract import ModelInfo
from video_diffusion.delivery.webhooks import Dispatcher
from video_diffusion.lifecycle.record import (
    ModelState,
    Task,
    TaskStatus,
    admit,
    failure,
    queue_timed_out,
    result_expired,
)

log = logging.getLogger(__name__)

# What an RQ job runs, by import path (a worker of an older release cannot run a job of a newer one: drain first).
JOB_FUNCTION = "video_diffusion.backends.redis_worker.run_job"


REDIRECT_SECONDS = 300  # how long a presigned result URL works (RESULT_REDIRECT)
SERVED_FOR = 1.0  # seconds a read of the heartbeats answers "what do the workers serve" (they beat every few s)


class RedisBackend:
    """The API side: admits, enqueues, reads and cancels; a supervised reaper fails abandoned tasks."""

    def __init__(self, settings: Settings, connection: redis.Redis | None = None, *, telemetry,
                 clock: Clock | None = None):
        self.settings = settings
        self.clock = clock or Clock()
        self.redis = connection or connect(settings.redis)
        self.blobs = blobs.for_settings(settings)
        self.store = RedisStore(self.redis, settings, self.clock, self.blobs)
        max_bytes = settings.max_storage_mb * 2**20 if settings.max_storage_mb else None
        self.store_watch = StoreWatch(self.blobs, settings.result_ttl, max_bytes) if self.blobs else None
        self.queue = self.store.queue
        self.telemetry = telemetry
        telemetry.report_cluster(self.store.stats)
        self.supervisor = Supervisor()
        self._lock = threading.RLock()
        self._places = Places(self._lock)
        self._draining = False
        self.outbox = RedisOutbox(self.redis)
        self.idempotency = RedisIdempotency(self.redis, self.clock)
        self.dispatcher = Dispatcher.for_settings(self.outbox, settings, telemetry, self.clock)
        # (when read, what the ready workers serve by model name): remembered for SERVED_FOR seconds
        self._served: tuple[float, dict[str, ModelInfo]] = (float("-inf"), {})

    def _workers(self) -> list[dict]:
        """The live workers' heartbeats; what the ready ones serve is remembered for SERVED_FOR seconds, so that
        one request (admission, then validation against the served schema) reads the heartbeats once."""
        workers = self.store.workers()
        ready = [w for w in workers if w["state"] == "ready" and w.get("served")]
        self._served = (time.monotonic(), {w["served"]["name"]: ModelInfo.from_public(w["served"]) for w in ready})
        return workers

    def _waiting(self) -> int:
        """Jobs waiting in every model's queue, whether or not a worker serves it now (RQ keeps the set of queues
        that ever had a job), and the shared one older APIs used."""
        return sum(queue.count for queue in Queue.all(connection=self.redis)
                   if queue.name == QUEUE_NAME or queue.name.startswith(QUEUE_NAME + ":"))

    def start(self) -> None:
        if self.store_watch is not None:
            self.store_watch.check()  # a folder store was checked at start (gunicorn.conf.py); S3 may come later
            self.supervisor.spawn("result-store", lambda: self.store_watch.run(self.supervisor.stopping))
        self.supervisor.spawn("reaper", self._reap_loop)
        self.supervisor.spawn("redis-watch", lambda: self.store.watch(self.supervisor.stopping))
        self.supervisor.spawn("webhooks", lambda: self.dispatcher.run(self.supervisor.stopping))

    def _reap_loop(self) -> None:
        while not self.supervisor.stopping.wait(max(1.0, self.settings.worker_ttl / 3)):
            try:
                self.store.reap()
            except REDIS_ERRORS as exc:
                log.warning("reaper: Redis unreachable (%s); retrying", exc)

    def drain(self, timeout: float) -> None:
        """Refuse new work; nothing runs in the API process, and gunicorn waits for requests in flight."""
        self._draining = True

    def interrupt(self) -> None:
        """Stop now: the API runs no task, so nothing to record (the workers' own tasks go on)."""

    def stop(self) -> None:
        self.supervisor.stop(5)
        self.dispatcher.stop()
        self.redis.close()

    def admission(self, mode: str):
        def check(held: int) -> None:
            if self.store_watch is not None:
                self.store_watch.admit(0)  # an unusable or full store refuses before the body is read
            model, detail, waiting = self._capacity()
            admit(mode, draining=self._draining, model=model, ready_detail=detail, waiting=waiting + held,
                  max_queue=self.settings.max_queue)

        return self._places.hold(check)

    @unavailable_on_redis_errors
    def _capacity(self) -> tuple[ModelState, str, int]:
        workers = self._workers()
        return (*workers_verdict(workers), self._waiting())

    @unavailable_on_redis_errors
    def submit(self, task: Task, image: Image.Image) -> Task:
        """Enqueue an admitted task (runs inside `admission()`), or answer it from the result cache."""
        if not self._places.holding():
            raise RuntimeError("submit() runs inside admission(), which holds the task's place in line")
        if task.cache_key and (hit := self._answer_from_cache(task)) is not None:
            return hit
        png = io.BytesIO()
        image.save(png, format="PNG", compress_level=1)
        if self.blobs is not None:  # stored first: a worker that takes the job always finds it
            self.store_watch.admit(files_estimate(task, image))
            png.seek(0)
            try:
                self.blobs.put(input_name(task.task_id), png)
            except BlobStoreError as exc:
                raise errors.StorageUnavailable(f"{exc}; try again shortly", retry_after=30) from None
        with self.redis.pipeline() as pipe:  # MULTI: the record, its input and its job exist together or not at all
            pipe.multi()
            if self.blobs is None:
                pipe.set(redis_key("input", task.task_id), png.getvalue(), ex=self.settings.result_ttl)
            pipe.set(redis_key("task", task.task_id), task.to_json(), ex=self.settings.result_ttl + TOMBSTONE_SECONDS)
            pipe.sadd("vd:queued", task.task_id)
            # RQ's own timeout is a backstop behind the per-step JOB_TIMEOUT check, which fails cleanly.
            self.store.queue_of(task).enqueue_call(JOB_FUNCTION, args=(task.task_id,), job_id=task.task_id, timeout=self.settings.job_timeout + 60, result_ttl=0,
                                    failure_ttl=self.settings.result_ttl, pipeline=pipe)
            with self._lock:
                pipe.execute()
                self._places.release()  # RQ's queue counts it now
        self.telemetry.task_created(task)
        return task

    def _answer_from_cache(self, task: Task) -> Task | None:
        original = self.redis.get(redis_key("cache", task.cache_key))
        return answer_from_cache(self.get(original.decode()) if original else None, task, self.settings.result_ttl,
                                 self._keep_hit, self.dispatcher, self.telemetry, self.clock.now())

    def _keep_hit(self, hit: Task) -> bool:
        with self._lock:
            self.redis.set(redis_key("task", hit.task_id), hit.to_json(),
                           ex=self.settings.result_ttl + TOMBSTONE_SECONDS)
            self._places.release()
        return True

    @unavailable_on_redis_errors
    def get(self, task_id: str) -> Task | None:
        task = self.store.load(task_id)
        if task is None:
            return None
        self.store.fail_if_abandoned(task)
        if queue_timed_out(task, self.settings.queue_timeout, self.clock.now()) and \
                self.store.queue_of(task).remove(task_id):
            self._end_now(task, failure(errors.QueueTimeout))  # LREM: only if no worker took it meanwhile
        if task.status is TaskStatus.FINISHED:
            task.expired = result_expired(task, self.settings.result_ttl, self.clock.now())
        return task

    def _end_now(self, task: Task, error: dict) -> None:
        """End a task the API took out of RQ's queue (timed out or canceled): its job is deleted too."""
        job = self.store.queue_of(task).fetch_job(task.task_id)
        if job is not None:
            job.delete(remove_from_queue=False)
        status = TaskStatus.CANCELED if error["code"] == errors.TaskCanceled.code else TaskStatus.FAILED
        if self.store.end(task, status, error):
            self.telemetry.task_ended(task)
        elif (current := self.store.load(task.task_id)) is not None:  # it ended otherwise meanwhile
            task.__dict__.update(current.__dict__)

    @unavailable_on_redis_errors
    def result(self, task: Task) -> BinaryIO | None:
        if task.expired:
            return None
        try:
            return self.store.open_result(task.cached_from or task.task_id)
        except BlobStoreError as exc:
            raise errors.StorageUnavailable(f"{exc}; try again shortly", retry_after=30) from None

    def result_url(self, task: Task) -> str | None:
        """With RESULT_REDIRECT and an S3 store, a presigned URL of the video (valid REDIRECT_SECONDS)."""
        if not self.settings.result_redirect or self.blobs is None or task.expired:
            return None
        name = result_name(task.cached_from or task.task_id)
        try:
            stored = self.blobs.open(name)  # a video kept in Redis from before the store moved is served here
        except BlobStoreError as exc:
            raise errors.StorageUnavailable(f"{exc}; try again shortly", retry_after=30) from None
        if stored is None:
            return None
        stored.close()
        return self.blobs.presigned_url(name, REDIRECT_SECONDS, task.result["filename"], task.result["content_type"])

    @unavailable_on_redis_errors
    def queue_position(self, task_id: str) -> int | None:
        task = self.store.load(task_id)
        position = None if task is None else self.store.queue_of(task).get_job_position(task_id)
        return None if position is None else position + 1

    def wait(self, task_id: str, timeout: float) -> Task | None:
        deadline = time.monotonic() + timeout
        while True:
            task = self.get(task_id)
            if task is None or task.status.terminal or time.monotonic() >= deadline:
                return task
            time.sleep(0.1)

    @unavailable_on_redis_errors
    def cancel(self, task_id: str, reason: type = errors.TaskCanceled) -> Task | None:
        """A queued task still in RQ's queue ends now; otherwise its worker stops it at the next step. `reason`:
        the error the task ends with (its code is what the cancel key holds for the worker)."""
        task = self.get(task_id)
        if task is None or task.status.terminal:
            return task
        if task.status is TaskStatus.QUEUED and self.store.queue_of(task).remove(task_id):  # LREM: no worker has it
            self._end_now(task, failure(reason))
            return task
        self.redis.set(redis_key("cancel", task_id), reason.code, ex=self.settings.job_timeout + 120)
        return task

    def served_models(self) -> dict[str, ModelInfo]:
        read_at, served = self._served
        if time.monotonic() - read_at < SERVED_FOR:
            return served
        try:
            self._workers()
        except REDIS_ERRORS:
            return {}
        return self._served[1]

    def metrics(self) -> dict:
        try:
            workers = self._workers()
            waiting, pending = self._waiting(), self.outbox.pending()
        except REDIS_ERRORS:
            return {"model_ready": 0}
        ready = [w for w in workers if w["state"] == "ready"]
        return {"queue_depth": waiting, "workers_live": len(workers), "model_ready": int(bool(ready)),
                "tasks_running": sum(1 for w in workers if w.get("task")), "webhooks_pending": pending}

    def health(self) -> Health:
        components = self.supervisor.states()
        details = {"mode": "redis", "components": component_states(components, self.dispatcher)}
        try:
            workers = self._workers()
            waiting = self._waiting()
        except REDIS_ERRORS as exc:
            log.warning("health: Redis unreachable: %s", exc)
            return Health("unavailable", {**details, "redis": "unreachable"})
        model, error = workers_verdict(workers)
        store = self.store_watch
        status = derive_status(draining=self._draining, model=model, components=components,
                               storage=store.state if store is not None else "ok")
        if store is not None:
            details["result_store"] = store.health()
        ready = [w for w in workers if w["state"] == ModelState.READY.value]
        models: dict[str, int] = {}
        for worker in ready:
            if worker.get("served"):
                models[worker["served"]["name"]] = models.get(worker["served"]["name"], 0) + 1
        details.update(redis="ok", workers=len(ready), models=models, workers_not_ready=len(workers) - len(ready),
                       waiting=waiting, running=sum(1 for w in workers if w.get("task")))
        if ready:
            details.update({k: ready[0][k] for k in ("model", "noise", "device", "dtype")})
        elif model is ModelState.FAILED:
            details["error"] = {"code": "model_load_failed", "message": error}
        return Health("no_workers" if status == "loading" else status, details)


def workers_verdict(workers: list[dict]) -> tuple[ModelState, str]:
    """What the live workers' heartbeats say of the model, for admission and `/health` alike, with a sentence
    for clients: ready when any worker is; failed when every worker failed to load; else still to come."""
    states = {w["state"] for w in workers}
    if ModelState.READY.value in states:
        return ModelState.READY, ""
    if ModelState.WARMING_UP.value in states:
        return ModelState.WARMING_UP, "the model is warming up (SVD_COMPILE); try again shortly"
    failed = [w for w in workers if w["state"] == ModelState.FAILED.value]
    if failed and ModelState.LOADING.value not in states:
        return ModelState.FAILED, failed[0].get("error") or ""
    return ModelState.LOADING, "no worker is ready to run it (start `python worker.py`)"
