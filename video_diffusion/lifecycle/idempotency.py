"""`Idempotency-Key` on `POST /generate`: a client that retries a submit it never heard back from gets the task its
first try made, never a second one (the IETF httpapi draft's header, as payment APIs use it).

The rule, once for both backends: a key (scoped per API key) is first *claimed* with the request's fingerprint
(image bytes and parameters), then *bound* to the task it made. The same key again with the same request gets
that task; with another request, 422 `idempotency_key_reused`; while the first is still being submitted, 409 with
Retry-After (after waiting a few seconds for it). A claim that never bound (its request failed, or its process died) is released, so the client may
try again. Kept RESULT_TTL; stores: files (embedded) or Redis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from video_diffusion.clock import Clock
from video_diffusion.errors import InvalidParameter, ServiceError
from video_diffusion.files import write_atomic

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
CLAIM_SECONDS = 120.0  # a claim older than this that never bound is stale: its request died with its process


class KeyReused(ServiceError):
    status, code = 422, "idempotency_key_reused"


class KeyInFlight(ServiceError):
    status, code = 409, "idempotency_key_in_flight"


@dataclass
class Entry:
    fingerprint: str
    task_id: str | None  # None while claimed and not yet bound
    claimed_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Entry:
        return cls(**json.loads(text))


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise InvalidParameter(f"`{HEADER}` must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
                               field=HEADER)
    return key


def scoped(key: str, api_key: str) -> str:
    """The stored name of `key`: a hash of the API key the client used (keys of two clients never meet) and it."""
    return hashlib.sha256(f"{hashlib.sha256(api_key.encode()).hexdigest()}\0{key}".encode()).hexdigest()


def fingerprint(image: bytes, params: dict[str, str]) -> str:
    """What "the same request" means: the same image bytes and the same parameters as sent."""
    digest = hashlib.sha256(json.dumps(sorted(params.items())).encode())
    digest.update(b"\0")
    digest.update(image)
    return digest.hexdigest()


class Store(Protocol):
    def get(self, name: str) -> Entry | None: ...
    def claim(self, name: str, entry: Entry, ttl: int) -> Entry | None: ...  # None: claimed; else who has it
    def bind(self, name: str, entry: Entry, ttl: int) -> None: ...
    def release(self, name: str) -> None: ...


def stale(entry: Entry, now: float) -> bool:
    return entry.task_id is None and now - entry.claimed_at > CLAIM_SECONDS


def live(entry: Entry | None, ttl: int, now: float) -> Entry | None:
    """The entry unless it is past its RESULT_TTL or a stale claim."""
    if entry is None or stale(entry, now) or now > entry.claimed_at + ttl:
        return None
    return entry


def settle(existing: Entry, print_: str) -> str:
    """The task an earlier request with this key made, for a request with fingerprint `print_`; or the error."""
    if existing.fingerprint != print_:
        raise KeyReused(f"this {HEADER} was used for a different request (another image or parameters); use a new "
                        "key for a new request", field=HEADER)
    if existing.task_id is None:
        raise KeyInFlight(f"a request with this {HEADER} is still being submitted; retry shortly", retry_after=1)
    return existing.task_id


class FileStore:
    """The embedded backend's keys: `<VIDEO_OUTPUT_PATH>/.idempotency/<name>.json`, atomically written. One process
    owns the folder, so a lock in memory orders claims; claims of a previous process are dropped at start."""

    def __init__(self, folder: Path, clock: Clock):
        self.folder = folder
        self.clock = clock
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        now = clock.now()
        for path in self.folder.glob("*.json"):
            try:
                entry = Entry.from_json(path.read_bytes())
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if entry.task_id is None:  # its request died with the previous process
                path.unlink(missing_ok=True)
            elif now > entry.claimed_at + 400 * 86400:  # far past any RESULT_TTL that makes sense
                path.unlink(missing_ok=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> Entry | None:
        try:
            entry = Entry.from_json(self._path(name).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            log.error("idempotency key %s: unreadable entry; dropping it", name[:12])
            self._path(name).unlink(missing_ok=True)
            return None
        return entry

    def claim(self, name: str, entry: Entry, ttl: int) -> Entry | None:
        with self._lock:
            existing = live(self.get(name), ttl, self.clock.now())
            if existing is not None:
                return existing
            self._write(name, entry)
            return None

    def bind(self, name: str, entry: Entry, ttl: int) -> None:
        with self._lock:
            self._write(name, entry)

    def release(self, name: str) -> None:
        with self._lock:
            self._path(name).unlink(missing_ok=True)

    def sweep(self, ttl: int) -> int:
        """Delete the keys past RESULT_TTL (and stale claims); how many went. The janitor calls it."""
        now, gone = self.clock.now(), 0
        for path in self.folder.glob("*.json"):
            with self._lock:
                try:
                    entry = Entry.from_json(path.read_bytes())
                except FileNotFoundError:
                    continue
                except (ValueError, TypeError):
                    entry = None
                if entry is None or live(entry, ttl, now) is None:
                    path.unlink(missing_ok=True)
                    gone += 1
        return gone

    def _write(self, name: str, entry: Entry) -> None:
        write_atomic(self._path(name), lambda tmp: Path(tmp).write_text(entry.to_json()))
