"""Webhooks: a signed POST of the task's status JSON to the client's URL when the task ends (and, if asked, when
it starts). Written once for both backends: they keep the pending deliveries (an `Outbox`: files, or Redis) and
run a `Dispatcher`; everything else is here.

Signed per Standard Webhooks (standardwebhooks.com): `webhook-id` (the same for every attempt of one event),
`webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
under the key `WEBHOOK_SECRET=whsec_<base64>`.

Never an open relay: only hosts (and ports) listed in `WEBHOOK_ALLOW` are called, checked at submission and again
at delivery against the addresses the name resolves to, connecting to the checked address (no second lookup), and
no redirect is followed. A name that resolves to a loopback, private, link-local or otherwise non-public address is
refused unless that address itself is listed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Protocol
from urllib.parse import quote, urlsplit

from video_diffusion.clock import Clock
from video_diffusion.errors import InvalidParameter
from video_diffusion.files import write_atomic
from video_diffusion.lifecycle.record import status_document

log = logging.getLogger(__name__)

EVENTS = ("started", "ended")
URL_SAFE = "/%:@!$&'()*+,;=-._~?"  # kept as they are when a path or query is percent-encoded
ATTEMPT_TIMEOUT = 5.0  # seconds for any one network step of an attempt (connect, a write, a read)
ATTEMPT_DEADLINE = 10.0  # seconds for a whole attempt, connect to the answer's last byte: a trickle is cut off
STALLED_AFTER = 3 * ATTEMPT_DEADLINE  # senders all busy and none finished for this long: /health says "stalled"
RETRY_DELAYS = (5, 30, 120, 450)  # after each failed attempt: 5 attempts over about ten minutes
LEASE_SECONDS = 60.0  # a claimed delivery whose sender died is tried again after this
SENDERS = 4  # attempts in flight at once per process, at most one per destination (scheme, host, port)
POLL_SECONDS = 0.5


# --- the rules ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allowed:
    host: str
    port: int | None  # None: any port


def parse_allow(entries: Iterable[str]) -> tuple[Allowed, ...]:
    """`WEBHOOK_ALLOW` entries: `host`, `host:port`, `[v6]`, `[v6]:port` (hosts lower-cased)."""
    allowed = []
    for entry in entries:
        entry = entry.strip().lower()
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:
            host, port = entry, ""
        if not host or (port and not port.isdigit()):
            raise ValueError(f"{entry!r} is not a host or host:port")
        allowed.append(Allowed(host, int(port) if port else None))
    return tuple(allowed)


def _permits(allowed: tuple[Allowed, ...], host: str, port: int) -> bool:
    return any(a.host == host and a.port in (None, port) for a in allowed)


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str


def check_url(url: str, allowed: tuple[Allowed, ...]) -> Target:
    """The webhook URL if `WEBHOOK_ALLOW` permits it; InvalidParameter naming `webhook` otherwise. No connection."""
    def refuse(why: str) -> InvalidParameter:
        return InvalidParameter(f"`webhook` {why}", field="webhook")

    if not allowed:
        raise refuse("is not accepted: this server calls no webhooks (WEBHOOK_ALLOW is unset)")
    if len(url) > 2048 or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise refuse("must be an absolute http(s) URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise refuse("must be an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refuse("must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise refuse("must not carry a user name or password")
    try:  # an international name is sent as its ASCII (IDNA) form, as HTTP needs
        host = parts.hostname.lower().encode("idna").decode("ascii")
    except UnicodeError:
        raise refuse("names a host that is not a valid domain name") from None
    port = port or (443 if parts.scheme == "https" else 80)
    if not _permits(allowed, host, port):
        raise refuse("names a host or port this server does not call (WEBHOOK_ALLOW)")
    # An IRI's path and query are sent percent-encoded (UTF-8), escapes already there kept as they are.
    path = quote(parts.path or "/", safe=URL_SAFE) + (f"?{quote(parts.query, safe=URL_SAFE)}" if parts.query else "")
    return Target(url, parts.scheme, host, port, path)


def destination(url: str) -> str:
    """Where a delivery goes, as the dispatcher limits attempts in flight: scheme, host and port."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or ''}"
    except ValueError:
        return url


def parse_events(raw: str) -> list[str]:
    """`webhook_events`: a comma-separated subset of started, ended (ended is always delivered)."""
    events = {e.strip().lower() for e in raw.split(",") if e.strip()}
    if not events <= set(EVENTS):
        raise InvalidParameter(f"`webhook_events` must be a comma-separated list of {', '.join(EVENTS)}, got {raw!r}",
                               field="webhook_events")
    return [e for e in EVENTS if e in events | {"ended"}]


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature header value for one attempt."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def parse_secret(value: str) -> str:
    """`WEBHOOK_SECRET`: `whsec_` and base64 of at least 16 bytes."""
    if not value.startswith("whsec_"):
        raise ValueError("must start with whsec_ (then base64, e.g. whsec_$(openssl rand -base64 32))")
    try:
        key = base64.b64decode(value[6:], validate=True)
    except ValueError:
        raise ValueError("must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("must hold at least 16 bytes of key")
    return value


@dataclass
class Delivery:
    id: str  # webhook-id: one per task and event, the same on every attempt
    task_id: str
    event: str
    url: str
    body: str
    attempts: int = 0
    next_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Delivery:
        return cls(**json.loads(text))


def delivery_for(task, now: float) -> Delivery | None:
    """The delivery a task's new status calls for: `ended` for every end, `started` when asked for; else None."""
    webhook = getattr(task, "webhook", None)
    if not webhook:
        return None
    if task.status.terminal:
        event = "ended"
    elif task.status.value == "started" and "started" in webhook.get("events", ()):
        event = "started"
    else:
        return None
    body = json.dumps(status_document(task, queue_position=None, root=webhook.get("root", "")))
    return Delivery(id=f"msg_{task.task_id}_{event}", task_id=task.task_id, event=event, url=webhook["url"],
                    body=body, next_at=now)


# --- sending -----------------------------------------------------------------------------------------

class Refused(Exception):
    """The delivery may not be made (no longer allowed, or resolves to an address that is not): dropped."""


def _addresses(target: Target, allowed: tuple[Allowed, ...]) -> list[str]:
    """The addresses `target` may be reached at now: public ones, or non-public ones listed themselves."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {target.host}: {exc}") from None  # may resolve later: retried
    usable = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if address.is_global and not address.is_multicast:
            usable.append(str(address))
        elif _permits(allowed, str(address), target.port):
            usable.append(str(address))
    if not usable:
        raise Refused(f"{target.host} resolves only to addresses WEBHOOK_ALLOW does not list")
    return usable


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address already checked, sending the URL's host name in `Host`."""

    def __init__(self, address: str, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, address: str, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def attempt(delivery: Delivery, allowed: tuple[Allowed, ...], secret: str | None) -> int:
    """One POST of `delivery`; the receiver's status code. Refused when not allowed; OSError and
    http.client.HTTPException when the receiver cannot be reached or answers badly."""
    try:
        target = check_url(delivery.url, allowed)
    except InvalidParameter as exc:  # WEBHOOK_ALLOW changed since the submission
        raise Refused(exc.message) from None
    address = _addresses(target, allowed)[0]
    body = delivery.body.encode()
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": "video-diffusion-webhooks/1",
               "webhook-id": delivery.id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(secret, delivery.id, timestamp, body)
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = kind(address, target, ATTEMPT_TIMEOUT)
    late = threading.Event()

    def cut_off() -> None:  # the whole attempt's deadline: a receiver that trickles bytes loses its connection
        late.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(ATTEMPT_DEADLINE, cut_off)
    timer.daemon = True
    timer.start()
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(65536)  # what the receiver says does not matter, only its status
        if late.is_set():
            raise TimeoutError(f"the attempt took longer than {ATTEMPT_DEADLINE:.0f} s")
        return response.status
    except (OSError, http.client.HTTPException):
        if late.is_set():
            raise TimeoutError(f"the attempt took longer than {ATTEMPT_DEADLINE:.0f} s") from None
        raise
    finally:
        timer.cancel()
        connection.close()


class Outbox(Protocol):
    """Pending deliveries, kept where the backend keeps tasks, so they survive a restart."""

    def add(self, delivery: Delivery) -> None: ...
    # Due ones, leased to this process: at most one per destination, none to a destination in `busy`.
    def claim(self, now: float, limit: int, busy: frozenset[str] = frozenset()) -> list[Delivery]: ...
    def retry(self, delivery: Delivery) -> None: ...  # saved with its new attempts and next_at
    def remove(self, delivery: Delivery) -> None: ...  # delivered or dropped
    def pending(self) -> int: ...  # deliveries not yet delivered or dropped
    def trim(self, most: int) -> int: ...  # drop the oldest beyond `most`; how many went


class Dispatcher:
    """Sends what the outbox holds, in a few threads of its own: never in a request thread or the task runner.
    At least once: a delivery leaves the outbox only after a 2xx, a refusal, or its last attempt."""

    def __init__(self, outbox: Outbox, allowed: tuple[Allowed, ...], secret: str | None, telemetry,
                 clock: Clock | None = None, outbox_max: int = 10_000):
        self.outbox = outbox
        self.outbox_max = outbox_max
        self.clock = clock or Clock()  # when deliveries are due (the signature's timestamp is the real time)
        self.allowed = allowed
        self.secret = secret
        self.telemetry = telemetry
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._busy = 0  # deliveries handed to the pool and not yet done
        self._in_flight: set[str] = set()  # their destinations
        self._finished_at = time.monotonic()  # when an attempt last ended (or the senders were last idle)
        self.wake = threading.Event()

    @classmethod
    def for_settings(cls, outbox: Outbox, settings, telemetry, clock: Clock) -> Dispatcher:
        """The dispatcher every process builds: WEBHOOK_ALLOW and WEBHOOK_SECRET from its settings."""
        return cls(outbox, parse_allow(settings.webhook_allow or ()), settings.webhook_secret, telemetry, clock,
                   outbox_max=settings.webhook_outbox_max)

    def notify(self, task) -> None:
        """Queue the delivery the task's new status calls for, if any, and wake the senders (the outbox's error
        when it cannot be kept)."""
        delivery = delivery_for(task, self.clock.now())
        if delivery is not None:
            self.outbox.add(delivery)
            self.wake.set()

    def run(self, stopping: threading.Event) -> None:
        """The loop a Supervisor runs: claim what is due, hand it to a sender thread."""
        while not stopping.is_set():
            self.wake.wait(POLL_SECONDS)
            self.wake.clear()
            dropped = self.outbox.trim(self.outbox_max)
            if dropped:
                log.warning("webhook outbox over WEBHOOK_OUTBOX_MAX=%d: dropped the %d oldest", self.outbox_max,
                            dropped)
                self._outcome("dropped", dropped)
            with self._lock:
                free, busy = SENDERS - self._busy, frozenset(self._in_flight)
                if not self._busy:
                    self._finished_at = time.monotonic()
            claimed = self.outbox.claim(self.clock.now(), free, busy) if free else []
            with self._lock:
                self._busy += len(claimed)
                self._in_flight.update(destination(d.url) for d in claimed)
            for delivery in claimed:
                self._pool.submit(self._send, delivery)

    def state(self) -> str:
        """"stalled" when every sender is busy and none has finished an attempt for STALLED_AFTER seconds (each
        attempt has a deadline, so this means something is wrong); else "running"."""
        with self._lock:
            stuck = self._busy >= SENDERS and time.monotonic() - self._finished_at > STALLED_AFTER
        return "stalled" if stuck else "running"

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _send(self, delivery: Delivery) -> None:
        try:
            self._send_once(delivery)
        except Exception:  # noqa: BLE001 - the outbox could not be written: its lease runs out, it is tried again
            log.exception("webhook %s: its outcome could not be saved", delivery.id)
        finally:
            with self._lock:
                self._busy -= 1
                self._in_flight.discard(destination(delivery.url))
                self._finished_at = time.monotonic()

    def _send_once(self, delivery: Delivery) -> None:
        delivery.attempts += 1
        try:
            status = attempt(delivery, self.allowed, self.secret)
            problem = None if 200 <= status < 300 else f"answered {status}"
        except Refused as exc:
            log.warning("webhook %s for task %s dropped: %s", delivery.id, delivery.task_id, exc)
            self._outcome("dropped")
            self.outbox.remove(delivery)
            return
        except (OSError, http.client.HTTPException) as exc:
            status, problem = None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - cannot be sent as it is (a bug if submission let it in)
            log.error("webhook %s for task %s dropped: it cannot be sent (%s: %s)", delivery.id, delivery.task_id,
                      type(exc).__name__, exc)
            self._outcome("dropped")
            self.outbox.remove(delivery)
            return
        if problem is None:
            log.info("webhook %s for task %s delivered (attempt %d, %d)", delivery.id, delivery.task_id,
                     delivery.attempts, status)
            self._outcome("delivered")
            self.outbox.remove(delivery)
        elif status is not None and 300 <= status < 400:
            log.warning("webhook %s for task %s dropped: %s (redirects are not followed)", delivery.id,
                        delivery.task_id, problem)
            self._outcome("dropped")
            self.outbox.remove(delivery)
        elif delivery.attempts > len(RETRY_DELAYS):
            log.warning("webhook %s for task %s dropped after %d attempts: %s", delivery.id, delivery.task_id,
                        delivery.attempts, problem)
            self._outcome("dropped")
            self.outbox.remove(delivery)
        else:
            delay = RETRY_DELAYS[delivery.attempts - 1]
            log.info("webhook %s for task %s: attempt %d %s; retrying in %d s", delivery.id, delivery.task_id,
                     delivery.attempts, problem, delay)
            delivery.next_at = self.clock.now() + delay
            self._outcome("retried")
            self.outbox.retry(delivery)

    def _outcome(self, outcome: str, count: int = 1) -> None:
        if self.telemetry is not None:
            self.telemetry.webhooks.labels(outcome).inc(count)


def one_per_destination(due: Iterable[Delivery], limit: int, busy: frozenset[str]) -> list[Delivery]:
    """Up to `limit` of `due` (in order), one per destination and none to a busy one: a slow receiver holds one
    sender, never the others' turns."""
    chosen, taken = [], set(busy)
    for delivery in due:
        if len(chosen) >= limit:
            break
        where = destination(delivery.url)
        if where not in taken:
            chosen.append(delivery)
            taken.add(where)
    return chosen


class FileOutbox:
    """The embedded backend's outbox: one JSON file per pending delivery under `<VIDEO_OUTPUT_PATH>/.webhooks/`,
    written atomically; read once at start (this process owns the folder)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: dict[str, Delivery] = {}
        self._leased: set[str] = set()
        for path in sorted(self.folder.glob("msg_*.json")):
            try:
                delivery = Delivery.from_json(path.read_bytes())
            except (ValueError, TypeError) as exc:
                log.error("webhook outbox: unreadable %s (%s); removing it", path.name, type(exc).__name__)
                path.unlink(missing_ok=True)
                continue
            self._pending[delivery.id] = delivery
        if self._pending:
            log.info("webhook outbox: %d pending deliveries", len(self._pending))

    def _path(self, delivery: Delivery) -> Path:
        return self.folder / f"{delivery.id}.json"

    def add(self, delivery: Delivery) -> None:
        write_atomic(self._path(delivery), lambda tmp: Path(tmp).write_text(delivery.to_json()))
        with self._lock:
            self._pending[delivery.id] = delivery

    def claim(self, now: float, limit: int, busy: frozenset[str] = frozenset()) -> list[Delivery]:
        with self._lock:
            due = sorted((d for d in self._pending.values() if d.next_at <= now and d.id not in self._leased),
                         key=lambda d: d.next_at)
            chosen = one_per_destination(due, limit, busy)
            self._leased.update(d.id for d in chosen)
            return [Delivery(**asdict(d)) for d in chosen]

    def trim(self, most: int) -> int:
        with self._lock:
            extra = len(self._pending) - most
            if extra <= 0:
                return 0
            oldest = sorted((d for d in self._pending.values() if d.id not in self._leased),
                            key=lambda d: d.next_at)[:extra]
        for delivery in oldest:
            self.remove(delivery)
        return len(oldest)

    def retry(self, delivery: Delivery) -> None:
        try:
            self.add(delivery)
        finally:
            with self._lock:
                self._leased.discard(delivery.id)

    def remove(self, delivery: Delivery) -> None:
        self._path(delivery).unlink(missing_ok=True)
        with self._lock:
            self._pending.pop(delivery.id, None)
            self._leased.discard(delivery.id)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)
