"""The task lifecycle, written once: the record, its legal transitions, admission, timeouts, expiry, failure
codes, the result-cache rules and the status document clients (and webhooks) read. Both backends call these
rules; they store and transport, they do not decide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from PIL import Image

from encoders import FORMATS
from video_diffusion.errors import TASK_MESSAGES, ModelNotReady, QueueFull, ServiceError, ShuttingDown

log = logging.getLogger(__name__)

# How long a record outlives its result, so an expired task answers 410 rather than 404 (both backends).
TOMBSTONE_SECONDS = 7 * 86400

_ID = re.compile(r"[0-9a-f]{32}")


class TaskStatus(str, Enum):
    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELED)


# The only moves a task may make. A terminal task never changes again; STARTED -> STARTED is a progress save.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.STARTED, TaskStatus.FAILED, TaskStatus.CANCELED}),
    TaskStatus.STARTED: frozenset({TaskStatus.STARTED, TaskStatus.FINISHED, TaskStatus.FAILED,
                                   TaskStatus.CANCELED}),
    TaskStatus.FINISHED: frozenset(), TaskStatus.FAILED: frozenset(), TaskStatus.CANCELED: frozenset(),
}


def sources(status: TaskStatus) -> list[TaskStatus]:
    """The statuses a task may be in to move to `status` (what a compare-and-set checks)."""
    return [origin for origin, targets in TRANSITIONS.items() if status in targets]


class IllegalTransition(RuntimeError):
    """A move the lifecycle forbids, e.g. failed -> finished: a bug or a lost race, never applied."""


class ModelState(str, Enum):
    LOADING = "loading"
    WARMING_UP = "warming_up"  # loaded; compiling and running one warm-up generation (SVD_COMPILE)
    READY = "ready"
    FAILED = "failed"


def failure(error: type[ServiceError]) -> dict[str, str]:
    """Why a task ended without a video: its error's stable code and the message a client can act on."""
    return {"code": error.code, "message": TASK_MESSAGES[error]}


def new_task_id() -> str:
    """128 random bits as 32 hex digits: the only handle on a task's video."""
    return secrets.token_hex(16)


def is_task_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))


class CorruptRecord(ValueError):
    """A stored task record that cannot be read back (truncated, empty, not JSON, wrong shape)."""


@dataclass
class Task:
    task_id: str
    mode: str  # "sync" or "async"
    params: dict[str, Any]
    status: TaskStatus = TaskStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    # waiting, loading, denoising, decoding, matching colour, looping, interpolating or retiming, encoding, done
    phase: str = "waiting"
    step: int = 0
    total_steps: int | None = None
    model: str | None = None
    error: dict[str, str] | None = None  # {"code", "message"} when failed or canceled
    result: dict[str, Any] | None = None  # format, content_type, filename, bytes, frames
    # seconds: queue_wait, generation, postprocessing, encoding
    timings: dict[str, float] = field(default_factory=dict)
    worker: str | None = None  # who runs it: an RQ worker's unique name (Redis mode)
    expired: bool = False  # the video was deleted after RESULT_TTL
    cache_key: str | None = None  # set when the request named its seed: what an identical request would have
    cached_from: str | None = None  # a result-cache hit: the task whose video this one answers with
    webhook: dict[str, Any] | None = None  # {"url", "events"}: called when the task ends (webhooks.py)
    output_bytes: int | None = None  # the video's frames in memory (frames x width x height x 3), estimated at submit
    owner: str | None = None  # the tenant (a digest of the API key) that made it; None without API keys
    model_name: str | None = None  # the served model it asked for (Redis mode: its queue); None before this field

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value})

    @classmethod
    def from_json(cls, text: str | bytes) -> Task:
        """Read a record and check it against the schema: fields a newer version added are ignored, ones it lacks
        take their defaults, a field of the wrong type is repaired to its default where that is safe (logged), and
        a record that cannot be trusted (no id, status, parameters or seed; a finished task without a readable
        result) is CorruptRecord, for the store to quarantine. Nothing downstream sees an unchecked record."""
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise CorruptRecord(f"unreadable task record: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise CorruptRecord("unreadable task record: not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        return checked({k: v for k, v in data.items() if k in known})

    def move(self, status: TaskStatus) -> None:
        """Change status, or IllegalTransition when the lifecycle forbids the move."""
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"task {self.task_id}: {self.status.value} -> {status.value}")
        self.status = status

    def start(self, now: float, worker: str | None = None) -> None:
        self.move(TaskStatus.STARTED)
        self.started_at, self.phase, self.worker = now, "loading", worker
        self.timings["queue_wait"] = self.started_at - self.created_at

    def finish(self, status: TaskStatus, error: dict[str, str] | None, now: float) -> None:
        self.move(status)
        self.error, self.finished_at = error, now
        if status is TaskStatus.FINISHED:
            self.phase = "done"


# --- the record's schema ----------------------------------------------------------------------------

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _or_none(rule):
    return lambda value: value is None or rule(value)


def _failure_shape(value: Any) -> bool:
    return isinstance(value, dict) and _text(value.get("code")) and _text(value.get("message"))


def _timings(value: Any) -> bool:
    return isinstance(value, dict) and all(_text(k) and _number(v) for k, v in value.items())


def _webhook(value: Any) -> bool:
    return isinstance(value, dict) and _text(value.get("url")) and isinstance(value.get("events", []), list)


# field: (rule, the repair where a wrong value is safe to replace; None: the record cannot be trusted)
_SCHEMA: dict[str, tuple[Any, Any]] = {
    "mode": (lambda v: v in ("sync", "async"), lambda data: "async"),
    "created_at": (_number, lambda data: next((data[k] for k in ("started_at", "finished_at")
                                               if _number(data.get(k))), time.time())),
    "started_at": (_or_none(_number), lambda data: None),
    "finished_at": (_or_none(_number), lambda data: None),
    "phase": (_text, lambda data: "waiting"),
    "step": (_count, lambda data: 0),
    "total_steps": (_or_none(_count), lambda data: None),
    "model": (_or_none(_text), lambda data: None),
    "error": (_or_none(_failure_shape), lambda data: None),
    "result": (_or_none(lambda v: isinstance(v, dict)), lambda data: None),
    "timings": (_timings, lambda data: {}),
    "worker": (_or_none(_text), lambda data: None),
    "expired": (lambda v: isinstance(v, bool), lambda data: False),
    "cache_key": (_or_none(_text), lambda data: None),
    "cached_from": (_or_none(_text), lambda data: None),
    "webhook": (_or_none(_webhook), lambda data: None),
    "output_bytes": (_or_none(_count), lambda data: None),
    "owner": (_or_none(_text), lambda data: None),
    "model_name": (_or_none(_text), lambda data: None),
}
DAMAGED = {"code": "storage_error", "message": "the task's stored record was damaged; submit it again"}


def _result_shape(result: Any) -> bool:
    return (isinstance(result, dict) and result.get("format") in FORMATS and _text(result.get("content_type"))
            and _text(result.get("filename")) and _count(result.get("bytes"))
            and _or_none(_count)(result.get("frames")) and _or_none(_number)(result.get("expires_at")))


def checked(data: dict[str, Any]) -> Task:
    """A Task from a decoded record, every field checked (see Task.from_json)."""
    task_id = data.get("task_id")
    if not isinstance(task_id, str) or not is_task_id(task_id):
        raise CorruptRecord("unreadable task record: no task id")
    try:
        status = TaskStatus(data.get("status", TaskStatus.QUEUED.value))
    except (ValueError, TypeError):
        raise CorruptRecord("unreadable task record: an unknown status") from None
    params = data.get("params")
    if not isinstance(params, dict) or not _count(params.get("seed")):
        raise CorruptRecord("unreadable task record: no parameters or seed")
    repaired = []
    for name, (rule, repair) in _SCHEMA.items():
        if name in data and not rule(data[name]):
            data[name] = repair(data)
            repaired.append(name)
    if status is TaskStatus.FINISHED and not _result_shape(data.get("result")):
        if not data.get("expired"):
            raise CorruptRecord("unreadable task record: a finished task without a readable result")
        data["result"], repaired = None, [*repaired, "result"]  # expired: nothing left to serve anyway
    if status.terminal and not _number(data.get("finished_at")):
        data["finished_at"], repaired = data.get("created_at", time.time()), [*repaired, "finished_at"]
    if status in (TaskStatus.FAILED, TaskStatus.CANCELED) and data.get("error") is None:
        data["error"], repaired = dict(DAMAGED), [*repaired, "error"]
    if repaired:
        log.warning("task %s: its record had %s of the wrong type; repaired to the default", task_id,
                    ", ".join(sorted(set(repaired))))
    return Task(**{**data, "status": status})


# --- the rules both backends apply -------------------------------------------------------------------

def admit(mode: str, *, draining: bool, model: ModelState, ready_detail: str, waiting: int, max_queue: int) -> None:
    """Whether a new task may join the line; raises the 503 that says why not.

    Checked before anything of the request is decoded or stored: refusing must cost nothing.
    """
    if draining:
        raise ShuttingDown("the service is shutting down; try again shortly", retry_after=10)
    if model is ModelState.FAILED:
        raise ModelNotReady(f"the model could not be loaded: {ready_detail}", retry_after=60)
    if model in (ModelState.LOADING, ModelState.WARMING_UP) and mode == "sync":
        raise ModelNotReady(ready_detail or ("the model is warming up (SVD_COMPILE); try again shortly"
                                             if model is ModelState.WARMING_UP else
                                             "the model is still loading; try again shortly"), retry_after=10)
    if waiting >= max_queue:
        raise QueueFull(f"{waiting} requests are already waiting (MAX_QUEUE={max_queue}); try again later",
                        retry_after=30)


def queue_timed_out(task: Task, queue_timeout: int, now: float) -> bool:
    """A queued task that waited past QUEUE_TIMEOUT: it must fail `queue_timeout` and never run."""
    return task.status is TaskStatus.QUEUED and now - task.created_at > queue_timeout


def result_expires_at(task: Task, result_ttl: int) -> float | None:
    if task.result and task.result.get("expires_at") is not None:  # a cache hit lives as long as the video
        return task.result["expires_at"]
    return None if task.finished_at is None else task.finished_at + result_ttl


def result_expired(task: Task, result_ttl: int, now: float) -> bool:
    """True once a finished task's video is past RESULT_TTL (deleted, or about to be)."""
    expires = result_expires_at(task, result_ttl)
    return task.expired or (expires is not None and now >= expires)


def record_expires_at(task: Task, result_ttl: int) -> float | None:
    """When an ended task's record may go: a grace period after its result, as Redis tombstones do."""
    expires = result_expires_at(task, result_ttl)
    return None if expires is None else expires + TOMBSTONE_SECONDS


# --- the result cache ------------------------------------------------------------------------------

CACHE_MIN_LIFE = 5.0  # seconds a cached video must still be kept to answer a repeat (time to download it)


def cache_key(image: Image.Image, params: dict[str, Any], model: str) -> str:
    """What makes two requests the same: the decoded input pixels, the parameters as given, the model."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": model, "mode": image.mode, "size": image.size, "params": params},
                             sort_keys=True).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def cacheable(task: Task) -> bool:
    """A finished task that made its own video for a request naming its seed: repeats may reuse it."""
    return task.status is TaskStatus.FINISHED and bool(task.cache_key) and task.cached_from is None


def reuse(original: Task | None, request: Task, result_ttl: int, now: float) -> Task | None:
    """`request` answered from `original`'s video, finished at once; None when it cannot be (gone, failed,
    expired or about to, or not the same request). The answer never outlives the video it points at."""
    if original is None or not cacheable(original) or original.cache_key != request.cache_key \
            or original.result is None or original.expired:
        return None
    expires = result_expires_at(original, result_ttl)
    if expires is None or expires - now < CACHE_MIN_LIFE:
        return None
    extension = FORMATS[original.result["format"]].extension
    return Task(task_id=request.task_id, mode=request.mode, params=dict(original.params),
                status=TaskStatus.FINISHED, created_at=now, started_at=now, finished_at=now, phase="done",
                step=original.step, total_steps=original.total_steps, model=original.model,
                result={**original.result, "filename": f"{request.task_id}.{extension}", "expires_at": expires},
                timings={"queue_wait": 0.0, "generation": 0.0, "postprocessing": 0.0, "encoding": 0.0},
                cache_key=request.cache_key, cached_from=original.task_id, webhook=request.webhook,
                owner=request.owner, output_bytes=request.output_bytes)


# --- what clients read -----------------------------------------------------------------------------

def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def status_document(task: Task, queue_position: int | None, root: str = "") -> dict:
    """The task as JSON, the same from `/status` and in a webhook (whose URLs are relative to the API's root)."""
    return {
        "task_id": task.task_id, "status": task.status.value, "mode": task.mode,
        "progress": {"phase": task.phase, "step": task.step, "total": task.total_steps},
        "queue_position": queue_position,
        "created_at": _iso(task.created_at), "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
        "seed": task.params["seed"], "params": task.params, "model": task.model, "timings": task.timings,
        "error": task.error, "expired": task.expired,
        "result": {k: task.result[k] for k in ("format", "content_type", "bytes", "frames")}
        if task.result and task.status is TaskStatus.FINISHED else None,
        "cached": task.cached_from is not None,
        "status_url": f"{root}/status/{task.task_id}",
        "result_url": f"{root}/results/{task.task_id}"
        if task.status is TaskStatus.FINISHED and not task.expired else None,
    }
