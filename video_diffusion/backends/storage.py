"""The data folder as a component with a health: who owns it, whether it can be written, how much it holds.

Checked by a supervised loop every few seconds and at once after a write fails:
- identity: the lock the process holds is on the inode the path names now. A folder deleted underneath is
  re-created and locked again (a second instance that took the path meanwhile keeps it; this one then says so);
- writable: a probe file is written and removed;
- bytes: inputs and videos under the folder against MAX_STORAGE_MB, and the disk's free space against
  MIN_FREE_DISK_MB.
Admission asks `admit(estimate)` with the request's estimated files (input and video, at the format's least
compression) before any work: over a budget, `507 storage_full` with Retry-After; a folder it cannot use, `503
storage_unavailable`. An admitted task's estimate stays reserved until it ends, so what is admitted together never
stores past the budget. `/health` answers 503 with the state's name while it is not "ok".
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

from encoders import FORMATS
from video_diffusion.backends.disk_store import DiskStore, FolderInUse, FolderUnusable
from video_diffusion.errors import StorageBudget, StorageUnavailable
from video_diffusion.lifecycle.record import is_task_id

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Storage:
    OK, FULL, UNAVAILABLE = "ok", "storage_full", "storage_unavailable"

    def __init__(self, store: DiskStore, *, max_bytes: int | None, min_free_bytes: int):
        self.store = store
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self.used = 0  # bytes of inputs and videos, as of the last scan plus what ended since
        self.free: int | None = None
        self.state, self.reason = self.OK, ""

    # --- the check ------------------------------------------------------------------------------------

    def check(self) -> str:
        """Look at the folder now (repairing a vanished one); the state, also kept for /health and admission."""
        try:
            if not self.store.owns_folder():
                log.warning("the data folder was removed or replaced underneath; re-creating it and locking it again")
                self.store.relock()
            self.store.probe_write()
            used, free = self.scan(), self.free_bytes()
        except FolderInUse:
            return self._set(self.UNAVAILABLE, "the data folder was removed and another instance has taken its path; "
                                               "restart this one with its own VIDEO_OUTPUT_PATH")
        except FolderUnusable:
            return self._set(self.UNAVAILABLE, "the data folder was removed and cannot be made again")
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                return self._set(self.FULL, "the disk is full")
            log.warning("the data folder cannot be used: %s", exc)
            return self._set(self.UNAVAILABLE, "the data folder cannot be written (removed, read-only or not "
                                               "permitted)")
        with self._lock:
            self.used, self.free = used, free
        return self._judge()

    def _judge(self) -> str:
        with self._lock:
            held = self.used + sum(self._reserved.values())
        if self.max_bytes is not None and held >= self.max_bytes:
            return self._set(self.FULL, f"the stored videos are at MAX_STORAGE_MB ({self.max_bytes // 2**20})")
        if self.free is not None and self.free < self.min_free_bytes:
            return self._set(self.FULL, f"the disk's free space is below MIN_FREE_DISK_MB "
                                        f"({self.min_free_bytes // 2**20})")
        return self._set(self.OK, "")

    def _set(self, state: str, reason: str) -> str:
        if state != self.state:
            (log.info if state == self.OK else log.error)("storage: %s%s", state, f" ({reason})" if reason else "")
        self.state, self.reason = state, reason
        return state

    def scan(self) -> int:
        """Bytes of the inputs and videos in the task folders (records, webhooks and keys are not counted)."""
        total = 0
        with os.scandir(self.store.root) as entries:
            for entry in entries:
                if not (is_task_id(entry.name) and entry.is_dir(follow_symlinks=False)):
                    continue
                try:
                    with os.scandir(entry.path) as files:
                        total += sum(f.stat().st_size for f in files if f.name != "task.json" and f.is_file())
                except FileNotFoundError:  # expired meanwhile
                    continue
        return total

    def free_bytes(self) -> int:
        stats = os.statvfs(self.store.root)
        return stats.f_bavail * stats.f_frsize

    # --- admission and the budget ---------------------------------------------------------------------

    def admit(self, estimate: int) -> None:
        """Whether a request whose files take about `estimate` bytes may be stored; raises what says why not."""
        if self.state == self.UNAVAILABLE:
            raise StorageUnavailable(f"the service cannot store anything: {self.reason}", retry_after=30)
        try:
            free = self.free_bytes()
        except OSError:
            self.check()
            raise StorageUnavailable("the service cannot store anything: the data folder cannot be read",
                                     retry_after=30) from None
        with self._lock:
            reserved = sum(self._reserved.values())
            if free - reserved - estimate < self.min_free_bytes:
                raise StorageBudget(f"the disk is nearly full: this request needs about {_mb(estimate)} MB and the "
                                    f"server keeps MIN_FREE_DISK_MB={self.min_free_bytes // 2**20} free; try again "
                                    "later", retry_after=60)
            check_max_storage(self.max_bytes, self.used + reserved, estimate)

    def reserve(self, task_id: str, estimate: int) -> None:
        with self._lock:
            self._reserved[task_id] = estimate

    def settle(self, task_id: str, folder: Path | None = None) -> None:
        """A task ended: its reservation goes, the files it left count (until the next scan counts them)."""
        stored = 0
        if folder is not None:
            try:
                stored = sum(p.stat().st_size for p in folder.iterdir() if p.name != "task.json")
            except OSError:
                pass
        with self._lock:
            self._reserved.pop(task_id, None)
            self.used += stored

    def reserved(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    def public(self) -> dict:
        """/health's view: the state and the byte counts (no paths)."""
        with self._lock:
            body = {"state": self.state, "stored_bytes": self.used, "reserved_bytes": sum(self._reserved.values()),
                    "max_bytes": self.max_bytes, "free_bytes": self.free, "min_free_bytes": self.min_free_bytes}
        if self.reason:
            body["reason"] = self.reason
        return body


def files_estimate(task, image=None) -> int:
    """Bytes a task's files may take: its video at the format's least compression, and its input if not stored
    yet (a PNG of the decoded image is at most about its raw size)."""
    video = int((task.output_bytes or 0) * FORMATS[task.params.get("format", "mp4")].worst_ratio)
    return video + (image.width * image.height * 3 if image is not None else 0)


def check_max_storage(max_bytes: int | None, stored: int, estimate: int) -> None:
    """MAX_STORAGE_MB at admission, for the data folder and for a folder result store alike: StorageBudget when
    what is stored (and held for admitted tasks) plus this request's estimated files would pass it."""
    if max_bytes is not None and stored + estimate > max_bytes:
        raise StorageBudget(f"the stored videos would pass MAX_STORAGE_MB={max_bytes // 2**20} (this request needs "
                            f"about {_mb(estimate)} MB); try again when older videos expire", retry_after=60)


def _mb(count: int) -> str:
    return f"{max(1, round(count / 2**20))}"
