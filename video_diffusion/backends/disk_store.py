"""Task folders on disk for the embedded backend: `<root>/<id>/task.json`, `input.png`, `video.<ext>`.

One process owns a root at a time (an OS lock, released by the kernel when the process dies). Records are
written atomically with fsync; a record that cannot be read is moved to `<root>/.quarantine/` with a log line,
so one bad file never stops the service or answers 500.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from encoders import FORMATS
from video_diffusion.files import write_atomic
from video_diffusion.lifecycle.record import CorruptRecord, Task, is_task_id

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
QUARANTINE = ".quarantine"


class FolderInUse(RuntimeError):
    """Another running instance owns VIDEO_OUTPUT_PATH."""


class FolderUnusable(RuntimeError):
    """VIDEO_OUTPUT_PATH cannot be created or written (read-only, not permitted, not a folder)."""


def folder_in_use_message(root: str | os.PathLike, holder: str) -> str:
    return (f"VIDEO_OUTPUT_PATH={root} is in use by another running instance{holder}. Give this one its own "
            "folder (VIDEO_OUTPUT_PATH=./data/other PORT=5014 make run), or run several API processes on Redis "
            "(REDIS_URL).")


def lock_folder(root: str | os.PathLike) -> int:
    """Take the exclusive lock on `root` and return its descriptor; FolderInUse when another process has it,
    FolderUnusable when the folder cannot be made or written."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(root) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FolderUnusable(f"VIDEO_OUTPUT_PATH={root}: cannot write there ({exc.strerror or 'not permitted'}); "
                             "point it at a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FolderInUse(folder_in_use_message(root, f" (pid {holder})" if holder.isdigit() else "")) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def probe_folder(root: str | os.PathLike) -> None:
    """Raise FolderInUse now if another instance owns `root` (the lock is taken and given back), FolderUnusable
    if it cannot be written."""
    os.close(lock_folder(root))
    try:
        _probe_write(Path(root))
    except OSError as exc:
        raise FolderUnusable(f"VIDEO_OUTPUT_PATH={root}: cannot write there ({exc.strerror or 'not permitted'}); "
                             "point it at a writable folder") from None


def _probe_write(root: Path) -> None:
    probe = root / ".probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class DiskStore:
    """Task folders under one root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FolderUnusable(f"VIDEO_OUTPUT_PATH={root}: cannot create it ({exc.strerror or 'not permitted'}); "
                                 "point it at a writable folder") from None
        self._lock_fd: int | None = None

    def lock(self) -> None:
        self._lock_fd = lock_folder(self.root)

    def owns_folder(self) -> bool:
        """Whether the lock held is on the lock file the path names now (False once the folder was deleted or
        replaced underneath: the old inode is locked, the path is anyone's)."""
        if self._lock_fd is None:
            return True
        held = os.fstat(self._lock_fd)
        try:
            named = os.stat(self.root / LOCK_FILE)
        except FileNotFoundError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino) and held.st_nlink > 0

    def relock(self) -> None:
        """Re-create the folder and lock it again; FolderInUse when another instance took the path meanwhile."""
        fd = lock_folder(self.root)
        old, self._lock_fd = self._lock_fd, fd
        if old is not None:
            os.close(old)

    def probe_write(self) -> None:
        _probe_write(self.root)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _dir(self, task_id: str) -> Path:
        if not is_task_id(task_id):  # ids come from clients: never build a path from anything else
            raise ValueError("not a task id")
        return self.root / task_id

    def write_input(self, task: Task, image: Image.Image) -> None:
        """The task's folder and its input image; the record is saved after, so a record always has its input."""
        folder = self._dir(task.task_id)
        folder.mkdir()
        try:
            write_atomic(folder / "input.png", lambda tmp: image.save(tmp, format="PNG", compress_level=1))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def save(self, task: Task) -> None:
        folder = self._dir(task.task_id)
        folder.mkdir(exist_ok=True)  # a folder deleted underneath: the record (not the files) comes back
        write_atomic(folder / "task.json", lambda tmp: Path(tmp).write_text(task.to_json()))

    def load(self, task_id: str) -> Task | None:
        """The record, or None when there is none or it was unreadable (then it is quarantined)."""
        if not is_task_id(task_id):
            return None
        path = self.root / task_id / "task.json"
        try:
            task = Task.from_json(path.read_bytes())
            if task.task_id != task_id:
                raise CorruptRecord("a record filed under another task's id")
            return task
        except FileNotFoundError:
            return None
        except (CorruptRecord, OSError) as exc:
            self.quarantine(task_id, str(exc))
            return None

    def quarantine(self, task_id: str, reason: str) -> None:
        """Move an unreadable task's folder aside, out of every listing, keeping it for a person to look at."""
        target = self.root / QUARANTINE / f"{task_id}-{int(time.time())}"
        log.error("task %s: %s; moved to %s", task_id, reason, target)
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(self.root / task_id, target)
        except OSError:
            log.exception("task %s: could not quarantine its folder", task_id)

    def load_image(self, task_id: str) -> Image.Image:
        with Image.open(self._dir(task_id) / "input.png") as image:
            return image.convert("RGB")

    def result_path(self, task: Task) -> Path:
        """Where the task's video is: its own folder, or for a result-cache hit the folder of the task it reuses."""
        return self._dir(task.cached_from or task.task_id) / f"video.{FORMATS[task.params['format']].extension}"

    def open_result(self, task: Task) -> BinaryIO | None:
        try:
            return open(self.result_path(task), "rb")
        except FileNotFoundError:
            return None

    def all_tasks(self) -> list[Task]:
        """Every readable record, oldest first (read once at start)."""
        tasks = [self.load(p.name) for p in self.root.iterdir() if is_task_id(p.name)]
        return sorted((t for t in tasks if t is not None), key=lambda t: t.created_at)

    def delete_input(self, task: Task) -> None:
        (self._dir(task.task_id) / "input.png").unlink(missing_ok=True)

    def delete_files(self, task: Task) -> None:
        """Remove the input and the video, keeping the record so the task answers 410, not 404."""
        folder = self._dir(task.task_id)
        for path in folder.iterdir() if folder.exists() else ():
            if path.name != "task.json":
                path.unlink(missing_ok=True)

    def delete(self, task_id: str) -> None:
        """Remove the task altogether: it answers 404 from now on."""
        shutil.rmtree(self._dir(task_id), ignore_errors=True)
