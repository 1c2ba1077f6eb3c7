"""gunicorn's threaded worker with a front that holds slow and hostile clients without spending a thread.

gunicorn 27's gthread worker gives a connection to a pool thread as soon as a byte arrives, and that thread
then reads headers and body with no deadline: 16 clients trickling headers take every thread, /health
included. Here the worker's event loop reads each request, headers and body, into a buffer first, with a
deadline for the whole request and one for silence; only a complete request reaches a thread, and the
parser then reads it from memory. Probes (/health, /livez, /metrics) run on a pool of their own, so they
always have a thread. Errors gunicorn itself answers (400, 414, 431, 501, ...) are JSON like the app's.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import selectors
import socket
import struct
import time
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

from config import load_settings
from video_diffusion.web.middleware import KNOWN_METHODS

HEADER_LIMIT = 64 * 1024  # bytes of request line and headers (gunicorn's own limits answer 414/431 below it)
IDLE_LIMIT = 15.0  # seconds a request may go without a byte (REQUEST_TIMEOUT bounds the whole)
SEND_TIMEOUT = 30  # seconds a response may wait on a client that does not read it
PROBE_PATHS = (b"/health", b"/livez", b"/metrics")
PROBE_THREADS = 2
LINGER_SECONDS = 2.0  # how long a closed connection waits for the client's own close, as gunicorn's graceful close
# and how much of what the client still sends it reads (and discards) meanwhile: enough for the rest of an upload
# refused from its Content-Length, which a proxy such as nginx sends on before it reads the answer
LINGER_BYTES = 1 << 30
LINGER_CHUNK = 64 * 1024  # read at a time
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.I | re.M)
_CHUNKED = re.compile(rb"^transfer-encoding[ \t]*:.*chunked", re.I | re.M)
_CODES = {400: "bad_request", 403: "forbidden", 408: "request_timeout", 413: "payload_too_large",
          414: "uri_too_long", 417: "expectation_failed", 431: "header_fields_too_large",
          501: "not_implemented", 503: "busy"}
_MESSAGES = {400: "the request is not valid HTTP", 414: "the request line is too long",
             431: "the request's header fields are too large", 501: "that transfer coding is not supported",
             403: "forbidden", 417: "expectation failed"}


access_log = logging.getLogger("video_diffusion.access")
_PRINTABLE = re.compile(rb"[^\x21-\x7e]")


def _request_line(data: bytes) -> tuple[str, str]:
    """The method and path of a request's first line, as a log may show them (printable, at most 200 bytes of
    path; nothing that could forge a log line)."""
    words = bytes(data[:4096]).split(b"\r\n", 1)[0].split(b" ")
    method = _PRINTABLE.sub(b"?", words[0][:16]).decode("ascii") if words and words[0] else "-"
    path = _PRINTABLE.sub(b"?", words[1].split(b"?", 1)[0][:200]).decode("ascii") if len(words) > 1 else "-"
    return method, path


def json_error(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response with the service's JSON error body; the connection closes after it."""
    body = json.dumps({"error": {"code": _CODES.get(status, "http_error"), "message": message}}).encode()
    extra = f"Retry-After: {retry_after}\r\n" if retry_after else ""
    return (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


@dataclass
class _Incoming:
    """A request being received."""

    data: bytearray = field(default_factory=bytearray)
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    header_end: int | None = None  # index just past the blank line
    length: int | None = None  # body bytes (Content-Length)
    chunked: bool = False
    scan: int = 0  # chunked: where the next chunk-size line starts


class _Reject(Exception):
    def __init__(self, status: int, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.response = json_error(status, reason, message, retry_after)


class _Captured:
    """Stands in for a client socket to catch the error response gunicorn writes, so it can be rewritten."""

    def __init__(self):
        self.data = b""

    def gettimeout(self):
        return 0.0

    def send(self, data):
        self.data += bytes(data)
        return len(data)

    sendall = send


class _Conn(TConn):
    """gunicorn's connection, whose graceful close lingers in the worker's event loop without blocking it."""

    def __init__(self, worker, *args):
        super().__init__(*args)
        self.worker = worker

    def close(self, graceful=False):
        if graceful and not self.cfg.is_ssl:
            self.worker.linger(self.sock)
        else:
            super().close(graceful)


class FrontWorker(ThreadWorker):
    """`worker_class = "video_diffusion.web.front.FrontWorker"` in gunicorn.conf.py."""

    def init_process(self):
        settings = load_settings()
        self.body_limit = settings.max_upload_mb * 1024 * 1024
        self.request_timeout = float(settings.request_timeout)
        self.idle_timeout = min(IDLE_LIMIT, self.request_timeout)
        # Bodies being received are held in memory; beyond this, new uploads are refused (503) until some land.
        self.buffer_budget = max(4 * self.body_limit, 64 * 1024 * 1024)
        self.buffered = 0
        self.incoming: dict[object, _Incoming] = {}
        self.heads: dict[object, bytes] = {}  # socket -> the start of the request a pool thread is handling
        self.lingering: dict[socket.socket, list] = {}  # socket -> [deadline, bytes read]
        self.probe_pool = futures.ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="probe")
        super().init_process()

    # --- receiving a request in the event loop ------------------------------------------------------

    def accept(self, listener):
        """gunicorn's accept, with a connection that closes without blocking the loop (`_Conn`)."""
        try:
            sock, address = listener.accept()
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                return
            raise
        self.nr_conns += 1
        sock.setblocking(True)
        self.enqueue_req(_Conn(self, self.cfg, sock, address, listener.getsockname()))

    def enqueue_req(self, conn):
        if self.cfg.is_ssl:  # TLS is a reverse proxy's job here; served as gunicorn serves it
            return super().enqueue_req(conn)
        incoming = _Incoming()
        if conn.parser is not None:  # a kept-alive connection may have read ahead into its next request
            incoming.data += conn.parser.unreader.take_buffered()
        conn.sock.setblocking(False)
        self.incoming[conn] = incoming
        self.buffered += len(incoming.data)
        if not self._advance(conn, incoming):
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, _sock):
        incoming = self.incoming.get(conn)
        if incoming is None:
            return
        try:
            chunk = conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client went away before its request was whole
            self._drop(conn)
            return
        incoming.data += chunk
        incoming.last = time.monotonic()
        self.buffered += len(chunk)
        self._advance(conn, incoming)

    def _advance(self, conn, incoming: _Incoming) -> bool:
        """Dispatch or refuse the request once that can be decided; say whether it was."""
        try:
            if self.buffered > self.buffer_budget:
                raise _Reject(503, "Service Unavailable", "too many uploads are arriving; try again shortly", 5)
            if not self._complete(incoming):
                return False
        except _Reject as reject:
            self._drop(conn, reject.response)
            return True
        self._dispatch(conn, incoming)
        return True

    def _complete(self, incoming: _Incoming) -> bool:
        data = incoming.data
        if incoming.header_end is None:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > HEADER_LIMIT:
                    raise _Reject(431, "Request Header Fields Too Large", _MESSAGES[431])
                return False
            incoming.header_end = end + 4
            head = bytes(data[:end])
            if _CHUNKED.search(head):
                incoming.chunked, incoming.scan = True, incoming.header_end
            else:
                match = _CONTENT_LENGTH.search(head)
                incoming.length = int(match.group(1)) if match else 0
                if incoming.length > self.body_limit:
                    raise _Reject(413, "Payload Too Large", f"the request is larger than MAX_UPLOAD_MB="
                                  f"{self.body_limit // (1024 * 1024)} MiB")
        if incoming.chunked:
            return self._chunks_complete(incoming)
        return len(data) - incoming.header_end >= incoming.length

    def _chunks_complete(self, incoming: _Incoming) -> bool:
        """Walk chunk sizes as they arrive; complete at the zero-size chunk and the blank line after it."""
        data = incoming.data
        while True:
            line_end = data.find(b"\r\n", incoming.scan)
            if line_end < 0:
                return False
            size_text = bytes(data[incoming.scan:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                return True  # malformed: gunicorn's parser says so, as JSON
            if len(data) - incoming.header_end > self.body_limit:
                raise _Reject(413, "Payload Too Large", f"the request is larger than MAX_UPLOAD_MB="
                              f"{self.body_limit // (1024 * 1024)} MiB")
            if size == 0:  # then optional trailers, then a blank line
                return data.find(b"\r\n\r\n", line_end) >= 0
            if len(data) < line_end + 2 + size + 2:
                return False
            incoming.scan = line_end + 2 + size + 2

    def _dispatch(self, conn, incoming: _Incoming) -> None:
        self._unregister(conn)
        self.incoming.pop(conn, None)
        self.buffered -= len(incoming.data)
        conn.prebuffered = bytes(incoming.data)
        first_line = conn.prebuffered.split(b"\r\n", 1)[0].split(b" ")
        path = first_line[1].split(b"?", 1)[0] if len(first_line) > 1 else b""
        pool = self.probe_pool if path in PROBE_PATHS else self.tpool
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _account(self, data: bytes, status: int, started: float, client) -> None:
        """One access-log line and one count for a request the front answered itself, as the app does for its
        own (route `front`: no route saw it)."""
        method, path = _request_line(data)
        duration_ms = (time.monotonic() - started) * 1000
        try:
            telemetry = self.wsgi.extensions["video_diffusion"].telemetry
            telemetry.http.labels(method if method in KNOWN_METHODS else "other", "front", str(status)).inc()
        except (AttributeError, KeyError):  # before the app exists
            pass
        access_log.info("%s %s %s %.1f ms client=%s task=- (answered by the front)", method, path, status,
                        duration_ms, client[0] if client else "?",
                        extra={"method": method, "path": path, "status": status, "duration_ms": round(duration_ms, 1)})

    def _drop(self, conn, response: bytes | None = None) -> None:
        """Close a connection whose request never became whole (answering it first, if there is an answer)."""
        incoming = self.incoming.pop(conn, None)
        if incoming is not None:
            self.buffered -= len(incoming.data)
            if response:
                status = response.split(b" ", 2)[1]
                self._account(incoming.data, int(status) if status.isdigit() else 0, incoming.started, conn.client)
        self._unregister(conn)
        self.nr_conns -= 1
        if not response:
            conn.close()
            return
        try:
            conn.sock.send(response)
        except OSError:
            conn.close()
            return
        self.linger(conn.sock)  # the client (or its proxy) may still be sending the body: let it read the answer

    def _unregister(self, conn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass  # not registered yet (complete on arrival) or already closed

    # --- closing: RFC 9112 section 9.6, in the event loop ----------------------------------------------

    def linger(self, sock: socket.socket) -> None:
        """Close a connection that is not kept alive: FIN first, then read what the client still sends until it
        closes too, so that request bytes left unread cannot make the kernel reset the answer. gunicorn does this
        blocking, in the event loop, for up to 2 s a connection: every client that reads its answer and keeps
        the socket open (Python's requests, after a refused upload) froze the whole worker that long. Here the
        reading happens on readiness, and `murder_pending` closes what is still open after LINGER_SECONDS."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
            self.poller.register(sock, selectors.EVENT_READ, self._drain)
        except (OSError, ValueError, KeyError):
            sock.close()
            return
        self.lingering[sock] = [time.monotonic() + LINGER_SECONDS, 0]

    def _drain(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(LINGER_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        state = self.lingering.get(sock)
        if state is not None:
            state[1] += len(data)
            if not data or state[1] >= LINGER_BYTES:
                self._end_linger(sock)

    def _end_linger(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        sock.close()

    def murder_pending(self):
        """Also drop requests that took too long to arrive, or went silent (408); end lingering closes."""
        super().murder_pending()
        now = time.monotonic()
        for sock, (deadline, _read) in list(self.lingering.items()):
            if now > deadline:
                self._end_linger(sock)
        for conn, incoming in list(self.incoming.items()):
            if now - incoming.started > self.request_timeout or now - incoming.last > self.idle_timeout:
                self.log.info("dropped a request from %s that did not arrive whole: %d bytes in %.1f s, "
                              "%.1f s since the last (%r)", conn.client[0] if conn.client else "?",
                              len(incoming.data), now - incoming.started, now - incoming.last,
                              bytes(incoming.data[:60]))
                self._drop(conn, json_error(408, "Request Timeout", f"the request did not arrive whole within "
                                            f"REQUEST_TIMEOUT={self.request_timeout:.0f} s, or paused for "
                                            f"{self.idle_timeout:.0f} s"))

    # --- in a pool thread -------------------------------------------------------------------------------

    def handle(self, conn):
        data = getattr(conn, "prebuffered", None)
        if data is not None:
            self.heads[conn.sock] = data[:4096]  # for handle_error's access-log line; gone once handled
            conn.prebuffered = None
            conn.data_ready = True
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(data)
            timeout = struct.pack("ll", SEND_TIMEOUT, 0)  # a client that stops reading frees the thread
            for option in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
                conn.sock.setsockopt(socket.SOL_SOCKET, option, timeout)
        try:
            return super().handle(conn)
        finally:
            self.heads.pop(conn.sock, None)

    def handle_error(self, req, client, addr, exc):
        """gunicorn's own classification and log line, with the service's JSON body instead of its HTML."""
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)
        status_line = captured.data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 500
        reason = status_line[2] if len(status_line) > 2 else "Error"
        message = _MESSAGES.get(status, "internal error; the server log has the details")
        self._account(self.heads.get(client, b""), status, time.monotonic(), addr if isinstance(addr, tuple) else None)
        try:
            client.setblocking(False)
            client.send(json_error(status, reason, message))
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EAGAIN):
                self.log.debug("could not send the error response: %s", error)
