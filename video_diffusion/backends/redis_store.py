"""Storage for the scale-out backend: tasks in Redis, run by RQ workers (`python worker.py`) that hold the model.

This module is what both sides share (`redis_api.py` in the API, `redis_worker.py` in each worker): the keys, the
Lua scripts, the task store, the webhook outbox and the Idempotency-Key store.

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
    vd:stats         the cluster's task outcomes and durations (telemetry.tally), added with each change of status

Every change of a task's status is one compare-and-set (a Lua script): it applies only if the record is in a
status the lifecycle allows it to leave (and, for a worker, still its own), with its side effects (the sets,
the input, the video) in the same step. So a failed task can never become finished, last write never wins.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
from typing import BinaryIO

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from config import Settings
from video_diffusion.clock import Clock
from video_diffusion import errors
from video_diffusion.backends.blobs import Blobs, input_name, result_name
from video_diffusion.delivery.webhooks import LEASE_SECONDS, Delivery, delivery_for, one_per_destination
from video_diffusion.errors import BackendUnavailable
from video_diffusion.lifecycle.idempotency import Entry, stale
from video_diffusion.lifecycle.record import TOMBSTONE_SECONDS, CorruptRecord, Task, TaskStatus, failure, sources
from video_diffusion.telemetry import tally

log = logging.getLogger(__name__)

QUEUE_NAME = "video-diffusion"  # jobs of tasks that name no model (made by an older API): every worker takes them


def queue_name(model: str | None) -> str:
    """The RQ queue of a model's jobs: each worker takes its own model's (and the shared one)."""
    return f"{QUEUE_NAME}:{model}" if model else QUEUE_NAME


REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# A queued task is checked against RQ's lists only once it is this old: submission writes both in one
# transaction, so this only guards against clock skew between machines.
LOST_JOB_GRACE = 10.0

# KEYS: task, started set, queued set, input, result, webhook outbox, webhook delivery, cluster counts.
# ARGV: id, new record, record ttl, new status, expected worker ('' = any), result ttl, result ('' = none),
#       delivery id ('' = none), delivery, delivery due time, counts to add (JSON, telemetry.tally), then the
#       statuses the task may be in.
_TRANSITION = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local current = cjson.decode(raw)
local allowed = false
for i = 12, #ARGV do
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
if current['status'] ~= status then
  for field, amount in pairs(cjson.decode(ARGV[11])) do redis.call('HINCRBYFLOAT', KEYS[8], field, amount) end
end
return 1
"""

OUTBOX = "vd:webhooks"
STATS = "vd:stats"

# Claim due deliveries: each is leased (re-scored to now + lease) so that one sender has it at a time, and
# another takes it up when that sender dies. KEYS: outbox. ARGV: now, lease end, limit.
# ARGV: now, lease end, ids chosen: each still due is leased (another process may have taken it meanwhile).
_LEASE = """
local leased = {}
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
    table.insert(leased, ARGV[i])
  end
end
return leased
"""
# ARGV: most, record key prefix. The oldest due beyond `most` go (leased ones score later: they stay).
_TRIM = """
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if extra <= 0 then return 0 end
local gone = redis.call('ZPOPMIN', KEYS[1], extra)
for i = 1, #gone, 2 do redis.call('DEL', ARGV[2] .. gone[i]) end
return extra
"""
WATCH_SECONDS = 0.5  # how often `watch` pings Redis
CLAIM_WINDOW = 256  # due deliveries looked at per claim: enough to find other destinations behind a busy one


def redis_key(kind: str, name: str) -> str:
    return f"vd:{kind}:{name}"


def connect(url: str, blocking: bool = False) -> redis.Redis:
    """A client that fails fast when Redis is down (a worker's may block longer: it waits on the queue)."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=None if blocking else 3,
                                retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 1), health_check_interval=15)


def unavailable_on_redis_errors(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except REDIS_ERRORS as exc:
            log.warning("Redis unreachable in %s: %s", method.__name__, exc)  # host and port: log only
            raise BackendUnavailable("Redis is unreachable; try again shortly", retry_after=5) from None

    return wrapper


class RedisStore:
    """Task records and their files in Redis; every status change a compare-and-set."""

    def __init__(self, connection: redis.Redis, settings: Settings, clock: Clock, blobs: Blobs | None = None):
        self.redis = connection
        self.settings = settings
        self.clock = clock
        self.blobs = blobs  # RESULT_STORE outside Redis (a shared folder, S3); None: the files live in Redis
        self.queue = Queue(QUEUE_NAME, connection=connection)
        self._queues: dict[str, Queue] = {QUEUE_NAME: self.queue}
        self._transition = connection.register_script(_TRANSITION)
        # Since when (monotonic) Redis has answered promptly (`watch`); -inf until an outage is seen; None while down.
        self._reachable_since: float | None = float("-inf")

    def load(self, task_id: str) -> Task | None:
        data = self.redis.get(redis_key("task", task_id))
        if data is None:
            return None
        try:
            return Task.from_json(data)
        except CorruptRecord as exc:  # kept for a person to look at, out of every listing, for a tombstone's time
            quarantine = redis_key("quarantine", task_id)
            log.error("task %s: %s; moved to %s", task_id, exc, quarantine)
            with self.redis.pipeline() as pipe:
                pipe.rename(redis_key("task", task_id), quarantine)
                pipe.expire(quarantine, TOMBSTONE_SECONDS)
                try:
                    pipe.execute()
                except redis.ResponseError:  # gone meanwhile
                    pass
            return None

    def compare_and_set(self, task: Task, *, worker: str | None = None, result: bytes = b"",
             expected: list[TaskStatus] | None = None) -> bool:
        """Store `task` in its new status if the stored one may move there (or is in `expected`) and, given a
        `worker`, is still that worker's; say whether it did. The webhook delivery a change of status calls for
        joins the outbox in the same step."""
        delivery = delivery_for(task, self.clock.now())
        keys = [redis_key("task", task.task_id), "vd:started", "vd:queued", redis_key("input", task.task_id),
                redis_key("result", task.task_id), OUTBOX, redis_key("webhook", delivery.id if delivery else "none"),
                STATS]
        args = [task.task_id, task.to_json(), self.settings.result_ttl + TOMBSTONE_SECONDS, task.status.value,
                worker or "", self.settings.result_ttl, result,
                delivery.id if delivery else "", delivery.to_json() if delivery else "",
                delivery.next_at if delivery else 0, json.dumps(tally(task)),
                *(s.value for s in (expected or sources(task.status)))]
        return bool(self._transition(keys=keys, args=args))

    def stats(self) -> dict[str, float] | None:
        """The cluster's counts (`vd:stats`), None while Redis is unreachable."""
        try:
            return {field.decode(): float(value) for field, value in self.redis.hgetall(STATS).items()}
        except REDIS_ERRORS:
            return None

    def queue_of(self, task_or_model: Task | str | None) -> Queue:
        """The RQ queue a task's job is in (by the model it asked for), or a model's."""
        model = task_or_model.model_name if isinstance(task_or_model, Task) else task_or_model
        name = queue_name(model)
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.redis)
        return self._queues[name]

    def job_lost(self, task: Task) -> bool:
        """Whether a queued task's job is gone from everywhere a worker could still take it up, read through RQ's
        public API in the order RQ moves a job: its queue, the intermediate list it pops jobs into, then the worker
        it names on the job (set in the same transaction that takes the job off that list), so a job on the move
        is always seen in one of them. A job counts as held only by a live worker: one whose heartbeat names that
        RQ worker."""
        if task.status is not TaskStatus.QUEUED or self.clock.now() - task.created_at < LOST_JOB_GRACE:
            return False
        queue = self.queue_of(task)
        if queue.get_job_position(task.task_id) is not None:
            return False
        if task.task_id in queue.intermediate_queue.get_job_ids():
            return False
        try:
            holder = Job.fetch(task.task_id, connection=self.redis).worker_name
        except NoSuchJobError:
            holder = None
        return not holder or holder not in {beat.get("rq_worker") for beat in self.workers()}

    def heartbeat(self, name: str | None) -> dict | None:
        data = self.redis.get(redis_key("worker", name)) if name else None
        return json.loads(data) if data else None

    def workers(self) -> list[dict]:
        names = list(self.redis.scan_iter(match=redis_key("worker", "*"), count=100))
        return [json.loads(v) for v in self.redis.mget(names) if v] if names else []

    def end(self, task: Task, status: TaskStatus, error: dict | None, *, worker: str | None = None,
            result: bytes = b"") -> bool:
        """End `task` unless it already ended (or, for `worker`, is no longer its own)."""
        ended = copy_of(task)
        ended.finish(status, error, self.clock.now())
        if not self.compare_and_set(ended, worker=worker, result=result):
            return False
        task.__dict__.update(ended.__dict__)
        if self.blobs is not None:  # in Redis the transition itself deleted it
            self.blobs.delete(input_name(task.task_id))
        return True

    def read_input(self, task_id: str) -> bytes | None:
        """A waiting task's input image (PNG bytes), wherever RESULT_STORE keeps it."""
        if self.blobs is None:
            return self.redis.get(redis_key("input", task_id))
        stream = self.blobs.open(input_name(task_id))
        if stream is None:
            return None
        with stream:
            return stream.read()

    def open_result(self, task_id: str) -> BinaryIO | None:
        """A finished task's video as a seekable stream, or None once it is gone. Videos stored in Redis before
        RESULT_STORE moved them (`vd:result:<id>`) are still served until their keys expire."""
        if self.blobs is not None and (stream := self.blobs.open(result_name(task_id))) is not None:
            return stream
        data = self.redis.get(redis_key("result", task_id))
        return None if data is None else io.BytesIO(data)

    def watch(self, stopping) -> None:
        """The loop a Supervisor runs in every process that judges workers: a PING every WATCH_SECONDS on a
        connection of its own that gives up after a second. Redis down, or an answer slow or late (paused, a
        failover, this process stalled) marks an outage; judging resumes WORKER_TTL after Redis answers again."""
        probe = redis.Redis.from_url(self.settings.redis, socket_timeout=1, socket_connect_timeout=1)
        last_ok = None
        try:
            while not stopping.wait(WATCH_SECONDS):
                asked = time.monotonic()
                try:
                    probe.ping()
                except REDIS_ERRORS:
                    if self._reachable_since is not None:
                        log.warning("Redis does not answer: no task is judged abandoned until it has answered for "
                                    "WORKER_TTL=%d s", self.settings.worker_ttl)
                    self._reachable_since, last_ok = None, None
                    continue
                answered = time.monotonic()
                if self._reachable_since is None or answered - asked > 1.0 or (
                        last_ok is not None and answered - last_ok > 4 * WATCH_SECONDS):
                    if self._reachable_since is None or answered - self._reachable_since > self.settings.worker_ttl:
                        log.info("Redis answers again (or answered late): judging no worker for WORKER_TTL=%d s",
                                 self.settings.worker_ttl)
                    self._reachable_since = answered
                last_ok = answered
        finally:
            probe.close()

    def may_judge(self) -> bool:
        """Whether a worker's silence means it is gone: Redis has answered for the last WORKER_TTL (heartbeat keys
        expire on Redis's clock, which runs on while it is paused, so after an outage every key may be gone)."""
        since = self._reachable_since
        return since is not None and time.monotonic() - since >= self.settings.worker_ttl

    def reap(self) -> None:
        """Fail the tasks nobody will ever finish: running on a worker that is gone (or has moved on to another
        task), or queued with their RQ job gone. Both the API and every worker call it; none while `may_judge`
        says a worker's silence may be Redis's."""
        if not self.may_judge():
            return
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
            elif self.job_lost(task):
                log.warning("task %s: its job left the queue with no live worker; failing it as abandoned", task_id)
                self.end(task, TaskStatus.FAILED, failure(errors.WorkerLost))

    def fail_if_abandoned(self, task: Task) -> None:
        if task.status is not TaskStatus.STARTED or not self.may_judge():
            return
        beat = self.heartbeat(task.worker)
        if beat is None or beat.get("task") != task.task_id:
            if self.end(task, TaskStatus.FAILED, failure(errors.WorkerLost), worker=task.worker):
                log.warning("task %s: its worker %s is gone; failed it as abandoned", task.task_id, task.worker)


class RedisOutbox:
    """Pending webhook deliveries in Redis: any API or worker process may send them (leased, at least once)."""

    def __init__(self, connection: redis.Redis):
        self.redis = connection
        self._lease = connection.register_script(_LEASE)
        self._trim = connection.register_script(_TRIM)
        self._unreachable = False  # said once per outage, not every poll

    def add(self, delivery: Delivery) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(redis_key("webhook", delivery.id), delivery.to_json(), ex=7 * 86400)
            pipe.zadd(OUTBOX, {delivery.id: delivery.next_at})
            pipe.execute()

    def claim(self, now: float, limit: int, busy: frozenset[str] = frozenset()) -> list[Delivery]:
        try:
            ids = self.redis.zrangebyscore(OUTBOX, "-inf", now, start=0, num=CLAIM_WINDOW)
            found = self.redis.mget([redis_key("webhook", i.decode()) for i in ids]) if ids else []
            due = []
            for raw_id, data in zip(ids, found):
                if data is None:  # its record expired: nothing left to send
                    self.redis.zrem(OUTBOX, raw_id)
                    continue
                try:
                    due.append(Delivery.from_json(data))
                except (ValueError, TypeError):
                    log.error("webhook outbox: unreadable delivery %s; removing it", raw_id.decode(errors="replace"))
                    self.redis.zrem(OUTBOX, raw_id)
            chosen = one_per_destination(due, limit, busy)
            leased = set(self._lease(keys=[OUTBOX], args=[now, now + LEASE_SECONDS, *[d.id for d in chosen]])
                         if chosen else [])
        except REDIS_ERRORS as exc:
            if not self._unreachable:
                log.warning("webhooks: Redis unreachable (%s); retrying", exc)
            self._unreachable = True
            return []
        self._unreachable = False
        return [d for d in chosen if d.id.encode() in leased]

    def trim(self, most: int) -> int:
        try:
            return int(self._trim(keys=[OUTBOX], args=[most, redis_key("webhook", "")]))
        except REDIS_ERRORS:
            return 0

    def retry(self, delivery: Delivery) -> None:
        self.add(delivery)

    def pending(self) -> int:
        return self.redis.zcard(OUTBOX)

    def remove(self, delivery: Delivery) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(OUTBOX, delivery.id)
            pipe.delete(redis_key("webhook", delivery.id))
            pipe.execute()


class RedisIdempotency:
    """The Redis backend's keys: `vd:idem:<name>`, claimed with SET NX, expiring after RESULT_TTL."""

    def __init__(self, connection, clock: Clock):
        self.redis = connection
        self.clock = clock

    @unavailable_on_redis_errors
    def get(self, name: str) -> Entry | None:
        data = self.redis.get(redis_key("idem", name))
        return Entry.from_json(data) if data else None

    @unavailable_on_redis_errors
    def claim(self, name: str, entry: Entry, ttl: int) -> Entry | None:
        key = redis_key("idem", name)
        for _ in range(3):
            if self.redis.set(key, entry.to_json(), nx=True, ex=ttl):
                return None
            existing = self.get(name)
            if existing is None:
                continue  # expired in between: try again
            if not stale(existing, self.clock.now()):
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

    @unavailable_on_redis_errors
    def bind(self, name: str, entry: Entry, ttl: int) -> None:
        self.redis.set(redis_key("idem", name), entry.to_json(), ex=ttl)

    @unavailable_on_redis_errors
    def release(self, name: str) -> None:
        self.redis.delete(redis_key("idem", name))


def copy_of(task: Task) -> Task:
    return Task.from_json(task.to_json())
