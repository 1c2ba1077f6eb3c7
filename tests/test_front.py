"""The HTTP front under slow and hostile clients (real gunicorn, loopback only): connections cost no thread
until a whole request is in, probes always answer, memory per upload is bounded and paid after admission,
telemetry stays bounded, and every error is JSON."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import in_lane, SMALL, Gunicorn, image_bytes, ready_gunicorn
from test_async import LONG

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def front(tmp_path_factory, tiny_model_dir):
    with ready_gunicorn(tmp_path_factory.mktemp("front"),
                        {"SVD_MODEL": str(tiny_model_dir), "REQUEST_TIMEOUT": "3"}) as server:
        yield server


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def _response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one response read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _timed_get(url: str) -> float:
    started = time.monotonic()
    assert requests.get(url, timeout=5).status_code == 200
    return time.monotonic() - started


def _post(server, prefer: str, **params):
    return requests.post(server.url + "/generate", files={"image": ("i.png", image_bytes(), "image/png")},
                         data=params, headers={"Prefer": prefer}, timeout=120)


def test_trickling_headers_event_streams_and_waiting_clients_leave_probes_answering(front):
    stop = threading.Event()
    tricklers = []
    for _ in range(64):
        sock = _connect(front)
        sock.sendall(b"GET /params HTTP/1.1\r\nHost: x\r\n")
        tricklers.append(sock)

    def trickle():  # a header line every second, never the blank line; bounded by the test
        for _ in range(30):
            if stop.wait(1.0):
                return
            for sock in tricklers:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    running = _post(front, "respond-async", **LONG).json()["task_id"]
    streams, answers = [], []
    for _ in range(32):
        sock = _connect(front)
        sock.sendall(f"GET /status/{running}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        streams.append(sock)
    for sock in streams:
        sock.settimeout(5)
        answers.append(sock.recv(4096).split(b"\r\n", 1)[0])
    with ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(_post, front, "wait", **SMALL) for _ in range(8)]
        deadline = time.monotonic() + 20
        while requests.get(front.url + "/health", timeout=5).json()["waiting"] < 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        try:
            for _ in range(5):
                assert _timed_get(front.url + "/health") < 1.0
                assert _timed_get(front.url + "/livez") < 1.0
            started = time.monotonic()
            refused = _post(front, "wait", **SMALL)
            assert time.monotonic() - started < 2
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        finally:
            stop.set()
            requests.delete(f"{front.url}/tasks/{running}", timeout=5)
            for sock in tricklers + streams:
                sock.close()
        assert [w.result().status_code for w in waiting] == [200] * 8
    codes = [answer.split()[1] for answer in answers]
    assert codes.count(b"200") == 16 and codes.count(b"503") == 16, answers  # MAX_EVENT_STREAMS=16


def test_a_body_that_never_completes_is_dropped_after_the_read_timeout(front):
    sock = _connect(front)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000000\r\n"
                 b"\r\nhello")
    started = time.monotonic()
    status, headers, body = _response(sock)
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 3 + 2  # REQUEST_TIMEOUT=3, checked every second
    assert sock.recv(10) == b""  # and closed
    sock.close()


def test_clients_that_keep_their_closed_connections_open_stall_no_one(front):
    """A connection the server does not keep alive is closed with a linger for the client's own close (so unread
    request bytes cannot turn the last answer into a reset). gunicorn lingers up to 2 s in its event loop: eight
    clients that read their answer and keep the socket open froze every other connection for 16 s (a refused upload
    from Python's requests does exactly that)."""
    held = []
    try:
        for _ in range(8):
            sock = _connect(front)
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            held.append(sock)
        for sock in held:
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200"), answer  # answered; the client keeps its end open
        started = time.monotonic()
        probe = requests.get(front.url + "/livez", timeout=60)
        waited = time.monotonic() - started
        assert probe.status_code == 200 and waited < 4, waited  # lingering in the loop: 8 x 2 s before it
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("raw,status,code", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, "header_fields_too_large"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 9000 + b"\r\n", 431, "header_fields_too_large"),
    (b"\x16\x03\x01 not http at all\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400, "bad_request"),
])
def test_errors_gunicorn_answers_itself_are_json(front, raw, status, code):
    sock = _connect(front)
    sock.sendall(raw)
    got, headers, body = _response(sock)
    sock.close()
    assert got == status and headers["content-type"] == "application/json", body
    assert json.loads(body)["error"]["code"] == code


def test_the_fronts_own_answers_are_logged_and_counted(front):
    """Before: a 413/408/431 the front answered wrote no access-log line and was not in the request counter."""
    for raw, status in ((b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413),
                        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414)):
        sock = _connect(front)
        sock.sendall(raw)
        assert _response(sock)[0] == status
        sock.close()
    metrics = requests.get(front.url + "/metrics", timeout=5).text
    assert 'video_diffusion_http_requests_total{method="POST",route="front",status="413"}' in metrics
    assert 'route="front",status="414"' in metrics
    deadline = time.monotonic() + 5
    while "POST /generate 413" not in front.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "POST /generate 413" in front.logs() and "(answered by the front)" in front.logs()


def test_made_up_methods_do_not_grow_metrics(front):
    before = len(requests.get(front.url + "/metrics", timeout=5).content)
    per_socket, sockets = 1000, 8  # 8,000 made-up methods: one label set each would add ~800 KB

    def send_many(index: int) -> int:
        answered = 0
        with _connect(front) as sock:
            requests_bytes = b"".join(f"{_made_up(index * per_socket + i)} /x{i} HTTP/1.1\r\nHost: x\r\n\r\n"
                                      .encode() for i in range(per_socket))
            sock.sendall(requests_bytes)
            data = b""
            while data.count(b"HTTP/1.1 404") < per_socket:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            answered = data.count(b"HTTP/1.1 404")
        return answered

    with ThreadPoolExecutor(sockets) as pool:
        assert sum(pool.map(send_many, range(sockets))) == per_socket * sockets
    after = requests.get(front.url + "/metrics", timeout=5).text
    assert len(after.encode()) - before < 10 * 1024
    assert 'method="other",route="unmatched",status="404"' in after


def _made_up(number: int) -> str:
    """A distinct method name per number, of the letters an HTTP method token may have."""
    letters = ""
    while True:
        number, digit = divmod(number, 26)
        letters += chr(ord("A") + digit)
        if not number:
            return "ZZ" + letters


def _rss_peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS


def _worker_pid(server) -> int:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return int(children[0])


def _decodes(server) -> float:
    text = requests.get(server.url + "/metrics", timeout=30).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("video_diffusion_image_decode_seconds_count")))


def grey16_png(side: int = 6300) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _peak_growth_mb(pid: int, action):
    """What `action` returns, and how far it raised the process's peak resident memory (MB)."""
    _reset_peak(pid)
    base = _rss_peak_kb(pid)
    result = action()
    return result, (_rss_peak_kb(pid) - base) / 1024


def _upload_concurrently(server, png: bytes, count: int) -> list:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: _upload_big(server, png), range(count)))


def _upload_big(server, png: bytes, prefer: str = "respond-async"):
    return requests.post(server.url + "/generate", files={"image": ("big.png", png, "image/png")}, data=SMALL,
                         headers={"Prefer": prefer}, timeout=120)


@in_lane
def test_big_16_bit_uploads_cost_bounded_memory_in_the_process_that_holds_the_model(tmp_path, tiny_model_dir):
    png = grey16_png()
    assert len(png) < 100_000  # 77 KB of zeros that decode to 6300x6300x2 bytes
    server = Gunicorn(tmp_path, {"SVD_MODEL": str(tiny_model_dir)})
    try:
        server.wait_ready()
        pid = _worker_pid(server)
        assert _upload_big(server, png, prefer="wait").status_code == 200  # a generation's own memory comes first
        accepted, growth_mb = _peak_growth_mb(pid, lambda: _upload_concurrently(server, png, 4))
        print(f"4 concurrent 6300x6300 16-bit PNG uploads: worker peak RSS +{growth_mb:.0f} MB")
        assert [r.status_code for r in accepted] == [202] * 4
        assert growth_mb < 500, growth_mb
    finally:
        server.stop()


def test_uploads_to_a_full_line_are_refused_before_any_decode(tmp_path, redis_server):
    """Redis mode with no worker: the line fills and stays full, and nothing else runs to blur the numbers."""
    png = grey16_png()
    server = Gunicorn(tmp_path, {"REDIS_URL": redis_server.url, "MAX_QUEUE": "4"})
    try:
        server.wait_ready(path="/livez")  # no worker, so /health stays 503 no_workers
        pid = _worker_pid(server)
        small = image_bytes()  # filling the line needs no big decodes
        assert [_upload_big(server, small).status_code for _ in range(4)] == [202] * 4
        decodes = _decodes(server)
        refused, refused_mb = _peak_growth_mb(pid, lambda: _upload_concurrently(server, png, 20))
        print(f"20 uploads refused: API peak RSS +{refused_mb:.0f} MB")
        assert [r.json()["error"]["code"] for r in refused] == ["queue_full"] * 20
        assert _decodes(server) == decodes  # refused before any decode
        assert refused_mb < 30
    finally:
        server.stop()


def test_the_page_carries_a_content_security_policy_and_no_framing(client):
    for path in ("/", "/static/app.js"):
        response = client.get(path)
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "media-src 'self' blob:" in policy
        assert "frame-ancestors 'none'" in policy and response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/health").headers["X-Content-Type-Options"] == "nosniff"


def test_redirects_never_take_their_host_from_the_request(client):
    """No redirect is built from `Host`: a doubled slash is no task (404, no Location; slashes are not merged), and
    the Location of an accepted task is a path."""
    from conftest import upload

    doubled = client.get("/", environ_overrides={"PATH_INFO": "/status//" + "a" * 32},
                         headers={"Host": "evil.example"})
    assert doubled.status_code == 404 and "Location" not in doubled.headers
    accepted = client.post("/generate", data=upload(image_bytes(), **SMALL),
                           headers={"Host": "evil.example", "Prefer": "respond-async"})
    assert accepted.status_code == 202 and accepted.headers["Location"].startswith("/status/")


def test_a_sync_client_that_loses_redis_learns_its_task_id(tmp_path, redis_server, start_workers):
    import redis

    from conftest import settings_for, upload
    from server import create_app

    start_workers(1)
    app = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, WORKER_TTL="3"))
    client = app.test_client()
    try:
        result = {}
        thread = threading.Thread(target=lambda: result.update(response=client.post(
            "/generate", data=upload(image_bytes(), **LONG))))
        thread.start()
        connection = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 30
        while not (connection.scard("vd:queued") or connection.scard("vd:started")):  # accepted: in line or running
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        redis_server.stop()
        thread.join(30)
        response = result["response"]
        assert response.status_code == 503 and response.json["error"]["code"] == "redis_unavailable"
        assert len(response.json["task_id"]) == 32 and response.json["result_url"].endswith(response.json["task_id"])
        assert "127.0.0.1" not in response.get_data(as_text=True)
    finally:
        app.extensions["video_diffusion"].backend.stop()
