"""Tasks: their record and states, their folder on disk, and running one from image to video file."""

from __future__ import annotations

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
from errors import GenerationTimeout, ServiceError, TaskCanceled
from images import fit_image
from params import resolve_defaults

log = logging.getLogger(__name__)
CANCELED = {"code": "canceled", "message": "canceled by request"}
EXPIRED = {"code": "expired", "message": "the task waited longer than QUEUE_TIMEOUT and never ran; submit it again"}
SHUTTING_DOWN = {"code": "shutting_down", "message": "the service shut down before this task's turn; submit it again"}

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


def new_task_id() -> str:
    """128 random bits as 32 hex digits: the only handle on a task's video."""
    return secrets.token_hex(16)


def is_task_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))


@dataclass
class Task:
    task_id: str
    mode: str  # "sync" or "async"
    params: dict[str, Any]
    status: TaskStatus = TaskStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    phase: str = "waiting"  # waiting, loading, denoising, decoding, encoding, done
    step: int = 0
    total_steps: int | None = None
    model: str | None = None
    error: dict[str, str] | None = None  # {"code", "message"} when failed or canceled
    result: dict[str, Any] | None = None  # format, content_type, filename, bytes; expired once deleted
    timings: dict[str, float] = field(default_factory=dict)  # seconds: queue_wait, generation, encoding
    worker: str | None = None  # the RQ worker running it (Redis mode)
    expired: bool = False  # the video and input were deleted after RESULT_TTL

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value})

    @classmethod
    def from_json(cls, text: str) -> Task:
        data = json.loads(text)
        data["status"] = TaskStatus(data["status"])
        return cls(**data)

    def start(self, worker: str | None = None) -> None:
        self.status, self.started_at, self.phase, self.worker = TaskStatus.STARTED, time.time(), "loading", worker
        self.timings["queue_wait"] = self.started_at - self.created_at

    def finish(self, status: TaskStatus, error: dict[str, str] | None = None) -> None:
        self.status, self.error, self.finished_at = status, error, time.time()
        if status is TaskStatus.FINISHED:
            self.phase = "done"


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` then rename, so readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TaskStore:
    """Task folders under VIDEO_OUTPUT_PATH: `<id>/task.json`, `<id>/input.png`, `<id>/video.<ext>`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, task_id: str) -> Path:
        if not is_task_id(task_id):  # ids come from clients: never build a path from anything else
            raise ValueError(f"not a task id: {task_id!r}")
        return self.root / task_id

    def create(self, task: Task, image: Image.Image) -> None:
        folder = self._dir(task.task_id)
        folder.mkdir()
        _write_atomic(folder / "input.png", lambda tmp: image.save(tmp, format="PNG", compress_level=1))
        self.save(task)  # the record goes last: a record on disk always has its input beside it

    def save(self, task: Task) -> None:
        _write_atomic(self._dir(task.task_id) / "task.json", lambda tmp: Path(tmp).write_text(task.to_json()))

    def load(self, task_id: str) -> Task | None:
        if not is_task_id(task_id):
            return None
        try:
            return Task.from_json((self.root / task_id / "task.json").read_text())
        except FileNotFoundError:
            return None

    def load_image(self, task_id: str) -> Image.Image:
        with Image.open(self._dir(task_id) / "input.png") as image:
            return image.convert("RGB")

    def result_path(self, task: Task) -> Path:
        return self._dir(task.task_id) / f"video.{FORMATS[task.params['format']].extension}"

    def all_tasks(self) -> list[Task]:
        tasks = [self.load(p.name) for p in self.root.iterdir() if is_task_id(p.name)]
        return sorted((t for t in tasks if t is not None), key=lambda t: t.created_at)

    def delete_files(self, task: Task) -> None:
        """Remove the input and the video, keeping the record so the task answers 410, not 404."""
        for path in self._dir(task.task_id).iterdir():
            if path.name != "task.json":
                path.unlink(missing_ok=True)


def run_task(generator, task: Task, image: Image.Image, out_path: Path,
             progress: Callable[[str, int, int], None]) -> None:
    """Generate and encode `task`'s video into `out_path`, filling its resolved params, result and timings."""
    params = resolve_defaults(task.params, generator.model.defaults)
    sized = fit_image(image, params["width"], params["height"], params["sizing"])
    params["width"], params["height"] = sized.size
    task.params, task.model = params, generator.model.label
    started = time.perf_counter()
    frames = generator.generate(sized, params, progress)
    generated = time.perf_counter()
    progress("encoding", params["num_inference_steps"], params["num_inference_steps"])
    fmt = FORMATS[params["format"]]
    _write_atomic(out_path, lambda tmp: encode_video(frames, params["fps"], fmt.name, tmp))
    task.timings.update(generation=generated - started, encoding=time.perf_counter() - generated)
    task.result = {"format": fmt.name, "content_type": fmt.content_type, "bytes": out_path.stat().st_size,
                   "filename": f"{task.task_id}.{fmt.extension}", "frames": len(frames)}


def execute(generator, task: Task, load_image: Callable[[], Image.Image], out_path: Path,
            progress: Callable[[str, int, int], None]) -> tuple[TaskStatus, dict[str, str] | None]:
    """Run `task` and say how it ended: failures (a lost input included) become a status, never an exception."""
    try:
        run_task(generator, task, load_image(), out_path, progress)
    except TaskCanceled:
        return TaskStatus.CANCELED, CANCELED
    except ServiceError as exc:
        return TaskStatus.FAILED, {"code": exc.code, "message": exc.message}
    except Exception:  # noqa: BLE001 - one task's failure must not stop the runner
        log.exception("task %s failed", task.task_id)
        return TaskStatus.FAILED, {"code": "generation_failed", "message": "generation failed; the log has the details"}
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
