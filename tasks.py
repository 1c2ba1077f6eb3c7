"""The task lifecycle, written once: the record, its legal transitions, admission, timeouts, expiry, failure
codes, and running one task from image to video file. Both backends call these rules; they store and
transport, they do not decide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from encoders import FORMATS, encode_video
from errors import (GenerationTimeout, InvalidParameter, ModelNotReady, QueueFull, ServiceError, ShuttingDown,
                    TaskCanceled)
from images import fit_image
from params import MAX_SEED, resolve_defaults
from postprocess import colour_stats, make_loop, match_colours, retime

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


# Why a task ended without a video: a stable code and a message a client can act on.
FAILURES = {
    "canceled": "canceled by request",
    "queue_timeout": "the task waited longer than QUEUE_TIMEOUT and never ran; submit it again",
    "shutting_down": "the service shut down before this task's turn; submit it again",
    "interrupted": "the service stopped while this task was running; submit it again",
    "abandoned": "the worker running this task stopped (killed or lost); submit it again",
    "storage_error": "the task's files could not be written or read (disk full or removed); submit it again",
    "generation_failed": "generation failed; the log has the details",
    "internal_error": "the task runner failed; the log has the details",
}


def failure(code: str) -> dict[str, str]:
    return {"code": code, "message": FAILURES[code]}


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

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value})

    @classmethod
    def from_json(cls, text: str | bytes) -> Task:
        """Read a record; fields a newer version added are ignored, ones it lacks take their defaults."""
        try:
            data = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            task = cls(**{k: v for k, v in data.items() if k in known})
            task.status = TaskStatus(task.status)
        except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError and UnicodeDecodeError too
            raise CorruptRecord(f"unreadable task record: {type(exc).__name__}") from None
        if not is_task_id(str(task.task_id)) or not isinstance(task.params, dict):
            raise CorruptRecord("unreadable task record: no task id or parameters")
        return task

    def move(self, status: TaskStatus) -> None:
        """Change status, or IllegalTransition when the lifecycle forbids the move."""
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"task {self.task_id}: {self.status.value} -> {status.value}")
        self.status = status

    def start(self, worker: str | None = None) -> None:
        self.move(TaskStatus.STARTED)
        self.started_at, self.phase, self.worker = time.time(), "loading", worker
        self.timings["queue_wait"] = self.started_at - self.created_at

    def finish(self, status: TaskStatus, error: dict[str, str] | None = None) -> None:
        self.move(status)
        self.error, self.finished_at = error, time.time()
        if status is TaskStatus.FINISHED:
            self.phase = "done"


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


def queue_timed_out(task: Task, queue_timeout: int, now: float | None = None) -> bool:
    """A queued task that waited past QUEUE_TIMEOUT: it must fail `queue_timeout` and never run."""
    return task.status is TaskStatus.QUEUED and (now or time.time()) - task.created_at > queue_timeout


def result_expires_at(task: Task, result_ttl: int) -> float | None:
    if task.result and task.result.get("expires_at") is not None:  # a cache hit lives as long as the video
        return task.result["expires_at"]
    return None if task.finished_at is None else task.finished_at + result_ttl


def result_expired(task: Task, result_ttl: int, now: float | None = None) -> bool:
    """True once a finished task's video is past RESULT_TTL (deleted, or about to be)."""
    expires = result_expires_at(task, result_ttl)
    return task.expired or (expires is not None and (now or time.time()) >= expires)


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


def reuse(original: Task | None, request: Task, result_ttl: int, now: float | None = None) -> Task | None:
    """`request` answered from `original`'s video, finished at once; None when it cannot be (gone, failed,
    expired or about to, or not the same request). The answer never outlives the video it points at."""
    now = now or time.time()
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
                cache_key=request.cache_key, cached_from=original.task_id, webhook=request.webhook)


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, fsync, rename, fsync the folder: readers (and a power cut) see the old
    file or the whole new one, never an empty or half-written one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# --- running one task --------------------------------------------------------------------------------

def run_task(generator, task: Task, image: Image.Image, out_path: Path,
             progress: Callable[[str, int, int], None]) -> None:
    """Generate and encode `task`'s video into `out_path`, filling its resolved params, result and timings.

    Segments run one after the other, each conditioned on the last frame of the one before; then the loop, the
    change of frame rate and the encoding. Progress counts denoising steps across all segments.
    """
    params = resolve_defaults(task.params, generator.model.defaults)
    limit = generator.model.max_steps
    if limit is not None and params["num_inference_steps"] > limit:  # an API that did not know the model let it in
        raise InvalidParameter(f"`num_inference_steps` must be at most {limit} with {generator.model.name}, got "
                               f"{params['num_inference_steps']}", field="num_inference_steps")
    sized = fit_image(image, params["width"], params["height"], params["sizing"])
    params["width"], params["height"] = sized.size
    task.params, task.model = params, generator.model.label
    started = time.perf_counter()
    frames = generate_segments(generator, sized, params, progress)
    generated = time.perf_counter()
    steps = params["segments"] * params["num_inference_steps"]
    if params["loop"] != "none":
        progress("looping", steps, steps)
        frames = make_loop(frames, params["loop"])
    if params["output_fps"] != params["fps"]:
        progress("interpolating" if params["output_fps"] > params["fps"] else "retiming", steps, steps)
        frames = retime(frames, params["fps"], params["output_fps"], looped=params["loop"] != "none")
    processed = time.perf_counter()
    progress("encoding", steps, steps)
    fmt = FORMATS[params["format"]]
    write_atomic(out_path, lambda tmp: encode_video(frames, params["output_fps"], fmt.name, tmp))
    task.timings.update(generation=generated - started, postprocessing=processed - generated,
                        encoding=time.perf_counter() - processed)
    task.result = {"format": fmt.name, "content_type": fmt.content_type, "bytes": out_path.stat().st_size,
                   "filename": f"{task.task_id}.{fmt.extension}", "frames": len(frames)}


def generate_segments(generator, image: Image.Image, params: dict[str, Any],
                      progress: Callable[[str, int, int], None]):
    """`segments` pipeline calls chained on their last frames (seed + k for segment k), each later one without
    its first frame and colour-matched to the first: N + (segments - 1) x (N - 1) frames."""
    import numpy as np

    steps, count = params["num_inference_steps"], params["segments"]
    clips, reference, condition = [], None, image
    for k in range(count):
        def segment_progress(phase: str, step: int, total: int, done: int = k * steps) -> None:
            progress(phase, done + step, count * steps)

        frames = generator.generate(condition, {**params, "seed": (params["seed"] + k) % (MAX_SEED + 1)},
                                    segment_progress)
        if k == 0:
            reference = colour_stats(frames)
        else:
            progress("matching colour", (k + 1) * steps, count * steps)
            frames = match_colours(frames, reference)[1:]
        clips.append(frames)
        condition = Image.fromarray(frames[-1])
    return clips[0] if count == 1 else np.concatenate(clips)


def execute(generator, task: Task, load_image: Callable[[], Image.Image], out_path: Path,
            progress: Callable[[str, int, int], None]) -> tuple[TaskStatus, dict[str, str] | None]:
    """Run `task` and say how it ended: every failure becomes a status and a code, never an exception."""
    try:
        run_task(generator, task, load_image(), out_path, progress)
    except TaskCanceled:
        return TaskStatus.CANCELED, failure("canceled")
    except ServiceError as exc:
        return TaskStatus.FAILED, {"code": exc.code, "message": exc.message}
    except OSError:  # disk full, a folder deleted underneath, an unreadable input
        log.exception("task %s: storage failed", task.task_id)
        return TaskStatus.FAILED, failure("storage_error")
    except Exception:  # noqa: BLE001 - one task's failure must not stop the runner
        log.exception("task %s failed", task.task_id)
        return TaskStatus.FAILED, failure("generation_failed")
    return TaskStatus.FINISHED, None


def progress_recorder(task: Task, job_timeout: int, save: Callable[[Task], None],
                      cancel_requested: Callable[[], bool]) -> Callable[[str, int, int], None]:
    """The progress callback of a run: records each step, and stops the run when canceled or out of time."""
    deadline = time.monotonic() + job_timeout

    def progress(phase: str, step: int, total: int) -> None:
        if cancel_requested():
            raise TaskCanceled("canceled by request")
        task.phase, task.step, task.total_steps = phase, step, total
        save(task)
        if time.monotonic() > deadline:
            raise GenerationTimeout(f"the generation ran longer than JOB_TIMEOUT={job_timeout} s")

    return progress
