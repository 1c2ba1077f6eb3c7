"""The scale-out backend: tasks in Redis, run by RQ workers (`python worker.py`) that hold the model.

API and workers share nothing but Redis: task records, input images and finished videos all live there,
each with its TTL. Keys:

    vd:task:<id>     the task record (JSON), kept RESULT_TTL + a week so expired results answer 410
    vd:input:<id>    the normalised input image (PNG) until the task ends
    vd:result:<id>   the video, for RESULT_TTL
    vd:cache:<key>   result cache: the id of the task whose video answers a repeat of its request, until it expires
    vd:cancel:<id>   set by DELETE /tasks/<id>; the worker stops at its next step
    vd:worker:<name> a live worker's heartbeat (JSON, with the task it runs), expiring after WORKER_TTL
    vd:queued        ids of queued tasks, checked against RQ's queue so none stays queued once its job is gone
    vd:started       ids of running tasks, checked against the heartbeats to fail abandoned ones
    vd:webhooks      pending webhook deliveries by due time; vd:webhook:<id> holds each (webhooks.py)
    vd:idem:<hash>   an Idempotency-Key's request fingerprint and task (idempotency.py)

Every change of a task's status is one compare-and-set (a Lua script): it applies only if the record is in a
status the lifecycle allows it to leave (and, for a worker, still its own), with its side effects (the sets,
the input, the video) in the same step. So a failed task can never become finished, last write never wins.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

import redis
from PIL import Image
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue

from backend import Health, Places, Supervisor, derive_status
from config import Settings
from errors import BackendUnavailable, ServiceError
from idempotency import Entry, stale
from webhooks import LEASE_SECONDS, Delivery, Dispatcher, delivery_for, parse_allow
from tasks import (TOMBSTONE_SECONDS, CorruptRecord, ModelState, Task, TaskStatus, admit, cacheable, execute,
                   failure, progress_recorder, queue_timed_out, result_expired, result_expires_at, reuse, sources)

log = logging.getLogger(__name__)

QUEUE_NAME = "video-diffusion"
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# A queued task is checked against RQ's lists only once it is this old: submission writes both in one
# transaction, so this only guards against clock skew between machines.
LOST_JOB_GRACE = 10.0

# KEYS: task, started set, queued set, input, result, webhook outbox, webhook delivery.
# ARGV: id, new record, record ttl, new status, expected worker ('' = any), result ttl, result ('' = none),
#       delivery id ('' = none), delivery, delivery due time, then the statuses the task may be in.
_TRANSITION = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local current = cjson.decode(raw)
local allowed = false
for i = 11, #ARGV do
  if current['status'] == ARGV[i] then allowed = true end
end
if not allowed then return 0 end
if ARGV[5] ~= '' and current['worker'] ~= ARGV[5] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
local status = ARGV[4]
if status == 'started' then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[1])
elseif status ~= 'queued' then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[4])
  if ARGV[7] ~= '' then redis.call('SET', KEYS[5], ARGV[7], 'EX', ARGV[6]) end
end
if ARGV[8] ~= '' and current['status'] ~= status then
  redis.call('SET', KEYS[7], ARGV[9], 'EX', ARGV[3])
  redis.call('ZADD', KEYS[6], ARGV[10], ARGV[8])
end
return 1
"""

# Is a queued task's job still somewhere? KEYS: task, RQ queue list, RQ intermediate list, RQ job hash.
# ARGV: id, worker heartbeat key prefix, now, grace. Returns 1 when the job is lost (nobody will run it).
_JOB_LOST = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local task = cjson.decode(raw)
if task['status'] ~= 'queued' or tonumber(ARGV[3]) - task['created_at'] < tonumber(ARGV[4]) then return 0 end
if redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
if redis.call('LPOS', KEYS[3], ARGV[1]) then return 0 end
local holder = redis.call('HGET', KEYS[4], 'worker_name')
if holder and holder ~= '' then
  local runtime = string.match(holder, '^(.*):[^:]*$') or holder
  if redis.call('EXISTS', ARGV[2] .. runtime) == 1 then return 0 end
end
return 1
"""


OUTBOX = "vd:webhooks"

# Claim due deliveries: each is leased (re-scored to now + lease) so that one sender has it at a time, and
# another takes it up when that sender dies. KEYS: outbox. ARGV: now, lease end, limit.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
"""


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
            log.warning("Redis unreachable in %s: %s", method.__name__, exc)  # host and port: log only
            raise BackendUnavailable("Redis is unreachable; try again shortly", retry_after=5) from None

    return wrapper


class TaskStore:
    """Task records and their files in Redis; every status change a compare-and-set."""

    def __init__(self, connection: redis.Redis, settings: Settings):
        self.redis = connection
        self.settings = settings
        self.queue = Queue(QUEUE_NAME, connection=connection)
        self._transition = connection.register_script(_TRANSITION)
        self._job_lost = connection.register_script(_JOB_LOST)

    def load(self, task_id: str) -> Task | None:
        data = self.redis.get(_key("task", task_id))
        if data is None:
            return None
        try:
            return Task.from_json(data)
        except CorruptRecord as exc:
            log.error("task %s: %s; deleting it", task_id, exc)
            self.redis.delete(_key("task", task_id))
            return None

    def move(self, task: Task, *, worker: str | None = None, result: bytes = b"",
             expected: list[TaskStatus] | None = None) -> bool:
        """Store `task` in its new status if the stored one may move there (or is in `expected`) and, given a
        `worker`, is still that worker's; say whether it did. The webhook delivery a change of status calls for
        joins the outbox in the same step."""
        delivery = delivery_for(task)
        keys = [_key("task", task.task_id), "vd:started", "vd:queued", _key("input", task.task_id),
                _key("result", task.task_id), OUTBOX, _key("webhook", delivery.id if delivery else "none")]
        args = [task.task_id, task.to_json(), self.settings.result_ttl + TOMBSTONE_SECONDS, task.status.value,
                worker or "", self.settings.result_ttl, result,
                delivery.id if delivery else "", delivery.to_json() if delivery else "",
                delivery.next_at if delivery else 0,
                *(s.value for s in (expected or sources(task.status)))]
        return bool(self._transition(keys=keys, args=args))

    def job_lost(self, task_id: str) -> bool:
        keys = [_key("task", task_id), self.queue.key, self.queue.intermediate_queue_key, f"rq:job:{task_id}"]
        return bool(self._job_lost(keys=keys, args=[task_id, _key("worker", ""), time.time(), LOST_JOB_GRACE]))

    def heartbeat(self, name: str | None) -> dict | None:
        data = self.redis.get(_key("worker", name)) if name else None
        return json.loads(data) if data else None

    def workers(self) -> list[dict]:
        names = list(self.redis.scan_iter(match=_key("worker", "*"), count=100))
        return [json.loads(v) for v in self.redis.mget(names) if v] if names else []

    def end(self, task: Task, status: TaskStatus, error: dict | None, *, worker: str | None = None,
            result: bytes = b"") -> bool:
        """End `task` unless it already ended (or, for `worker`, is no longer its own)."""
        ended = copy_of(task)
        ended.finish(status, error)
        if not self.move(ended, worker=worker, result=result):
            return False
        task.__dict__.update(ended.__dict__)
        return True

    def reap(self) -> None:
        """Fail the tasks nobody will ever finish: running on a worker that is gone (or has moved on to another
        task), or queued with their RQ job gone. Both the API and every worker call it."""
        for raw_id in self.redis.smembers("vd:started"):
            task = self.load(raw_id.decode())
            if task is None or task.status is not TaskStatus.STARTED:
                self.redis.srem("vd:started", raw_id)
            else:
                self.fail_if_abandoned(task)
        for raw_id in self.redis.smembers("vd:queued"):
            task_id = raw_id.decode()
            task = self.load(task_id)
            if task is None or task.status is not TaskStatus.QUEUED:
                self.redis.srem("vd:queued", raw_id)
            elif self.job_lost(task_id):
                log.warning("task %s: its job left the queue with no live worker; failing it as abandoned", task_id)
                self.end(task, TaskStatus.FAILED, failure("abandoned"))

    def fail_if_abandoned(self, task: Task) -> None:
        if task.status is not TaskStatus.STARTED:
            return
        beat = self.heartbeat(task.worker)
        if beat is None or beat.get("task") != task.task_id:
            if self.end(task, TaskStatus.FAILED, failure("abandoned"), worker=task.worker):
                log.warning("task %s: its worker %s is gone; failed it as abandoned", task.task_id, task.worker)


class RedisOutbox:
    """Pending webhook deliveries in Redis: any API or worker process may send them (leased, at least once)."""

    def __init__(self, connection: redis.Redis):
        self.redis = connection
        self._claim = connection.register_script(_CLAIM)
        self._unreachable = False  # said once per outage, not every poll

    def add(self, delivery: Delivery) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(_key("webhook", delivery.id), delivery.to_json(), ex=7 * 86400)
            pipe.zadd(OUTBOX, {delivery.id: delivery.next_at})
            pipe.execute()

    def claim(self, now: float, limit: int) -> list[Delivery]:
        try:
            ids = self._claim(keys=[OUTBOX], args=[now, now + LEASE_SECONDS, limit])
            found = self.redis.mget([_key("webhook", i.decode()) for i in ids]) if ids else []
        except REDIS_ERRORS as exc:
            if not self._unreachable:
                log.warning("webhooks: Redis unreachable (%s); retrying", exc)
            self._unreachable = True
            return []
        self._unreachable = False
        deliveries = []
        for raw_id, data in zip(ids, found):
            if data is None:  # its record expired: nothing left to send
                self.redis.zrem(OUTBOX, raw_id)
                continue
            deliveries.append(Delivery.from_json(data))
        return deliveries

    def retry(self, delivery: Delivery) -> None:
        self.add(delivery)

    def remove(self, delivery: Delivery) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(OUTBOX, delivery.id)
            pipe.delete(_key("webhook", delivery.id))
            pipe.execute()


class RedisIdempotency:
    """The Redis backend's keys: `vd:idem:<name>`, claimed with SET NX, expiring after RESULT_TTL."""

    def __init__(self, connection):
        self.redis = connection

    @_unavailable_on_redis_errors
    def get(self, name: str) -> Entry | None:
        data = self.redis.get(_key("idem", name))
        return Entry.from_json(data) if data else None

    @_unavailable_on_redis_errors
    def claim(self, name: str, entry: Entry, ttl: int) -> Entry | None:
        key = _key("idem", name)
        for _ in range(3):
            if self.redis.set(key, entry.to_json(), nx=True, ex=ttl):
                return None
            existing = self.get(name)
            if existing is None:
                continue  # expired in between: try again
            if not stale(existing):
                return existing
            # A stale claim: take it over only if it is still the one we read (no one else took it over first).
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    if pipe.get(key) != existing.to_json().encode():
                        continue
                    pipe.multi()
                    pipe.set(key, entry.to_json(), ex=ttl)
                    pipe.execute()
                    return None
                except redis.WatchError:  # someone else changed it: look again
                    continue
        return self.get(name)

    @_unavailable_on_redis_errors
    def bind(self, name: str, entry: Entry, ttl: int) -> None:
        self.redis.set(_key("idem", name), entry.to_json(), ex=ttl)

    @_unavailable_on_redis_errors
    def release(self, name: str) -> None:
        self.redis.delete(_key("idem", name))


def copy_of(task: Task) -> Task:
    return Task.from_json(task.to_json())


class RedisBackend:
    """The API side: admits, enqueues, reads and cancels; a supervised reaper fails abandoned tasks."""

    def __init__(self, settings: Settings, connection: redis.Redis | None = None, *, telemetry):
        self.settings = settings
        self.redis = connection or connect(settings.redis)
        self.store = TaskStore(self.redis, settings)
        self.queue = self.store.queue
        self.telemetry = telemetry
        self.supervisor = Supervisor()
        self._lock = threading.RLock()
        self._places = Places(self._lock)
        self._draining = False
        self.outbox = RedisOutbox(self.redis)
        self.idempotency = RedisIdempotency(self.redis)
        self.dispatcher = Dispatcher(self.outbox, parse_allow(settings.webhook_allow or ()), settings.webhook_secret,
                                     telemetry)

    def start(self) -> None:
        self.supervisor.spawn("reaper", self._reap_loop)
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

    def stop(self) -> None:
        self.supervisor.stop(5)
        self.dispatcher.stop()
        self.redis.close()

    def admission(self, mode: str):
        def check(held: int) -> None:
            model, detail, waiting = self._capacity()
            admit(mode, draining=self._draining, model=model, ready_detail=detail, waiting=waiting + held,
                  max_queue=self.settings.max_queue)

        return self._places.hold(check)

    @_unavailable_on_redis_errors
    def _capacity(self) -> tuple[ModelState, str, int]:
        workers = self.store.workers()
        states = {w["state"] for w in workers}
        failed = [w for w in workers if w["state"] == "failed"]
        if "ready" in states:
            return ModelState.READY, "", self.queue.count
        if failed and not states & {"loading", "warming_up"}:
            return ModelState.FAILED, failed[0].get("error") or "", self.queue.count
        return ModelState.LOADING, "no worker is ready to run it (start `python worker.py`)", self.queue.count

    @_unavailable_on_redis_errors
    def submit(self, task: Task, image: Image.Image) -> Task:
        if not self._places.holding():
            with self.admission(task.mode):
                return self.submit(task, image)
        if task.cache_key and (hit := self._answer_from_cache(task)) is not None:
            return hit
        png = io.BytesIO()
        image.save(png, format="PNG", compress_level=1)
        with self.redis.pipeline() as pipe:  # MULTI: the record, its input and its job exist together or not at all
            pipe.multi()
            pipe.set(_key("input", task.task_id), png.getvalue(), ex=self.settings.result_ttl)
            pipe.set(_key("task", task.task_id), task.to_json(), ex=self.settings.result_ttl + TOMBSTONE_SECONDS)
            pipe.sadd("vd:queued", task.task_id)
            # RQ's own timeout is a backstop behind the per-step JOB_TIMEOUT check, which fails cleanly.
            self.queue.enqueue_call("redis_backend.run_job", args=(task.task_id,), job_id=task.task_id,
                                    timeout=self.settings.job_timeout + 60, result_ttl=0,
                                    failure_ttl=self.settings.result_ttl, pipeline=pipe)
            with self._lock:
                pipe.execute()
                self._places.release()  # RQ's queue counts it now
        self.telemetry.task_created(task)
        return task

    def _answer_from_cache(self, task: Task) -> Task | None:
        original = self.redis.get(_key("cache", task.cache_key))
        hit = reuse(self.get(original.decode()) if original else None, task, self.settings.result_ttl)
        if hit is None:
            return None
        with self._lock:
            self.redis.set(_key("task", hit.task_id), hit.to_json(),
                           ex=self.settings.result_ttl + TOMBSTONE_SECONDS)
            self._places.release()
        self.telemetry.task_created(hit)
        if (delivery := delivery_for(hit)) is not None:
            self.outbox.add(delivery)
            self.dispatcher.wake.set()
        return hit

    @_unavailable_on_redis_errors
    def get(self, task_id: str) -> Task | None:
        task = self.store.load(task_id)
        if task is None:
            return None
        self.store.fail_if_abandoned(task)
        if queue_timed_out(task, self.settings.queue_timeout) and self.queue.remove(task_id):
            self._end_now(task, failure("queue_timeout"))  # LREM: only if no worker took it meanwhile
        if task.status is TaskStatus.FINISHED:
            task.expired = result_expired(task, self.settings.result_ttl)
        return task

    def _end_now(self, task: Task, error: dict) -> None:
        """End a task the API took out of RQ's queue (timed out or canceled): its job is deleted too."""
        job = self.queue.fetch_job(task.task_id)
        if job is not None:
            job.delete(remove_from_queue=False)
        status = TaskStatus.CANCELED if error["code"] == "canceled" else TaskStatus.FAILED
        if self.store.end(task, status, error):
            self.telemetry.task_ended(task)
        elif (current := self.store.load(task.task_id)) is not None:  # it ended otherwise meanwhile
            task.__dict__.update(current.__dict__)

    @_unavailable_on_redis_errors
    def result(self, task: Task) -> BinaryIO | None:
        data = None if task.expired else self.redis.get(_key("result", task.cached_from or task.task_id))
        return None if data is None else io.BytesIO(data)

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
        """A queued task still in RQ's queue ends now; otherwise its worker stops it at the next step."""
        task = self.get(task_id)
        if task is None or task.status.terminal:
            return task
        if task.status is TaskStatus.QUEUED and self.queue.remove(task_id):  # LREM: no worker can have it
            self._end_now(task, failure("canceled"))
            return task
        self.redis.set(_key("cancel", task_id), "1", ex=self.settings.job_timeout + 120)
        return task

    def model_defaults(self) -> dict | None:
        try:
            ready = [w for w in self.store.workers() if w["state"] == "ready" and w.get("defaults")]
        except REDIS_ERRORS:
            return None
        return ready[0]["defaults"] if ready else None

    def metrics(self) -> dict:
        try:
            workers, waiting = self.store.workers(), self.queue.count
        except REDIS_ERRORS:
            return {"model_ready": 0}
        ready = [w for w in workers if w["state"] == "ready"]
        return {"queue_depth": waiting, "workers_live": len(workers), "model_ready": int(bool(ready)),
                "tasks_running": sum(1 for w in workers if w.get("task"))}

    def health(self) -> Health:
        components = self.supervisor.states()
        details = {"mode": "redis", "components": {name: state.value for name, state in components.items()}}
        try:
            workers, waiting = self.store.workers(), self.queue.count
        except REDIS_ERRORS as exc:
            log.warning("health: Redis unreachable: %s", exc)
            return Health("unavailable", {**details, "redis": "unreachable"})
        ready = [w for w in workers if w["state"] == "ready"]
        failed = [w for w in workers if w["state"] == "failed"]
        warming = any(w["state"] == ModelState.WARMING_UP.value for w in workers)
        model = ModelState.READY if ready else ModelState.WARMING_UP if warming else ModelState.LOADING
        status = derive_status(draining=self._draining, model=model, components=components)
        details.update(redis="ok", workers=len(ready), workers_not_ready=len(workers) - len(ready),
                       waiting=waiting, running=sum(1 for w in workers if w.get("task")))
        if ready:
            details.update({k: ready[0][k] for k in ("model", "noise", "device", "dtype")})
        elif failed:
            details["error"] = {"code": "model_load_failed", "message": failed[0].get("error") or ""}
        return Health("no_workers" if status == "loading" else status, details)


class TaskLost(ServiceError):
    """This worker's task was ended elsewhere (reaped as abandoned): stop working on it."""

    status, code = 409, "abandoned"


class WorkerRuntime:
    """The worker side: one per `worker.py` process, holding the pipeline the RQ jobs run on."""

    def __init__(self, settings: Settings, telemetry):
        self.settings = settings
        self.redis = connect(settings.redis)
        self.store = TaskStore(self.redis, settings)
        self.telemetry = telemetry
        # Unique per start: a worker restarted with the same pid (PID 1 in a container) is a new worker.
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.state, self.error, self.generator, self.current = ModelState.LOADING, None, None, None
        self.supervisor = Supervisor()
        self.dispatcher = Dispatcher(RedisOutbox(self.redis), parse_allow(settings.webhook_allow or ()),
                                     settings.webhook_secret, telemetry)

    def load(self, load_generator) -> None:
        try:
            self.generator = load_generator(self.settings)
            if getattr(self.generator, "needs_warm_up", False):
                self.state = ModelState.WARMING_UP
                self._beat_quietly()
                try:
                    self.generator.warm_up()
                except Exception:  # noqa: BLE001 - a failed warm-up only means the first job compiles
                    log.exception("the warm-up generation failed; jobs will compile on first use")
            self.state = ModelState.READY
        except Exception as exc:  # noqa: BLE001 - stay up and say why, rather than crash-loop
            from pipeline import describe_load_failure

            log.exception("the model failed to load")
            self.state, self.error = ModelState.FAILED, describe_load_failure(exc)
        self._beat_quietly()

    def metrics(self) -> dict:
        state = {"tasks_running": int(self.current is not None), "model_ready": int(self.state is ModelState.READY)}
        if self.generator is not None:
            state.update(self.generator.memory_stats())
        return state

    def beat(self) -> None:
        info = {"name": self.name, "state": self.state.value, "task": self.current, "error": self.error}
        if self.generator is not None:
            info.update(self.generator.describe(), defaults=self.generator.model.defaults)
        self.redis.set(_key("worker", self.name), json.dumps(info), ex=self.settings.worker_ttl)

    def _beat_quietly(self) -> None:
        try:
            self.beat()
        except REDIS_ERRORS as exc:
            log.warning("heartbeat: Redis unreachable (%s); retrying", exc)

    def start_heartbeat(self) -> None:
        self.supervisor.spawn("heartbeat", self._heartbeat_loop)
        self.supervisor.spawn("webhooks", lambda: self.dispatcher.run(self.supervisor.stopping))

    def _heartbeat_loop(self) -> None:
        while not self.supervisor.stopping.wait(self.settings.worker_ttl / 3):
            self._beat_quietly()
            try:
                self.store.reap()
            except REDIS_ERRORS:
                pass  # said by the beat above

    def stop(self) -> None:
        self.supervisor.stop(5)
        self.dispatcher.stop()
        try:
            self.redis.delete(_key("worker", self.name))
        except REDIS_ERRORS:
            pass

    def run(self, task_id: str) -> None:
        store = self.store
        task = store.load(task_id)
        if task is None or task.status.terminal:
            return
        if self.redis.exists(_key("cancel", task_id)):
            self._end_unstarted(task, TaskStatus.CANCELED, failure("canceled"))
            return
        if queue_timed_out(task, self.settings.queue_timeout):
            self._end_unstarted(task, TaskStatus.FAILED, failure("queue_timeout"))
            return
        self.current = task_id
        self.beat()  # the heartbeat names the task before the record does: the reaper never sees it unowned
        try:
            task.start(worker=self.name)
            if not store.move(task, expected=[TaskStatus.QUEUED]):
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
            self.redis.set(_key("cache", task.cache_key), task.task_id,
                           exat=int(result_expires_at(task, self.settings.result_ttl)))
        except REDIS_ERRORS as exc:  # repeats will generate again: slower, never wrong
            log.warning("task %s: not indexed for repeats, Redis unreachable (%s)", task.task_id, exc)

    def _end_unstarted(self, task: Task, status: TaskStatus, error: dict) -> None:
        if self.store.end(task, status, error):
            self.telemetry.task_ended(task)

    def _execute(self, task: Task) -> tuple[TaskStatus, dict | None, bytes]:
        def load_image() -> Image.Image:
            data = self.redis.get(_key("input", task.task_id))
            if data is None:
                raise FileNotFoundError("the task's input is gone from Redis")
            return Image.open(io.BytesIO(data)).convert("RGB")

        progress = progress_recorder(task, self.settings.job_timeout, self._save_progress,
                                     lambda: self._cancel_requested(task.task_id))
        with tempfile.TemporaryDirectory(prefix="vd-") as folder:
            out = Path(folder) / "video"
            status, error = execute(self.generator, task, load_image, out, progress)
            video = out.read_bytes() if status is TaskStatus.FINISHED else b""
        return status, error, video

    def _save_progress(self, task: Task) -> None:
        """Progress is best effort through a Redis outage; a task taken away (reaped) stops the run."""
        try:
            moved = self.store.move(task, worker=self.name)
        except REDIS_ERRORS as exc:
            log.warning("task %s: progress not saved, Redis unreachable (%s)", task.task_id, exc)
            return
        if not moved:
            raise TaskLost("this task was ended elsewhere")

    def _cancel_requested(self, task_id: str) -> bool:
        try:
            return bool(self.redis.exists(_key("cancel", task_id)))
        except REDIS_ERRORS:
            return False

    def _end_retrying(self, task: Task, status: TaskStatus, error: dict | None, video: bytes) -> bool:
        """Save the end, retrying through a Redis outage (up to JOB_TIMEOUT): a task never stays `started`."""
        delay, deadline = 0.2, time.monotonic() + self.settings.job_timeout
        while True:
            try:
                ended = self.store.end(task, status, error, worker=self.name, result=video)
                if not ended:
                    log.warning("task %s ended elsewhere (%s); dropping this worker's result", task.task_id,
                                (self.store.load(task.task_id) or task).status.value)
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
