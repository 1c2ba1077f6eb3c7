"""Webhooks: signed deliveries to a receiver on the loopback, retries, restarts, and the allow list.

Every receiver here listens on 127.0.0.1 or 127.0.0.2 (loopback) and every handler's wait is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks

from video_diffusion.delivery import webhooks
from conftest import SMALL, image_bytes, in_lane, settings_for, upload, wait_ready
from server import create_app

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef-test-key").decode()
ASYNC = {"Prefer": "respond-async"}


class Receiver:
    """A webhook receiver on a loopback address: answers each POST with the next of `statuses` (then 200), or
    holds it for `hang` seconds; counts every connection, even ones that never send a request."""

    def __init__(self, host: str = "127.0.0.1", statuses: tuple[int, ...] = (), hang: float = 0.0,
                 location: str | None = None, port: int = 0):
        self.requests: list[dict] = []
        self.connections = 0
        self.statuses = list(statuses)
        self.hang, self.location = hang, location
        self.hanging = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body, "at": time.time(), "path": self.path})
                if receiver.hang:
                    receiver.hanging.set()
                    receiver.release.wait(receiver.hang)  # bounded: ends by itself
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address):
                receiver.connections += 1
                return True

        self.server = Server((host, port), Handler)
        self.host, self.port = host, self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} of {count} deliveries arrived"
            time.sleep(0.05)
        return self.requests

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def verify(secret: str, headers: dict, body: bytes) -> bool:
    """Standard Webhooks verification, written here from the specification, independently of webhooks.py."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    if abs(time.time() - int(headers["webhook-timestamp"])) > 300:
        return False
    return any(hmac.compare_digest(sig.split(",", 1)[1], expected) for sig in headers["webhook-signature"].split()
               if sig.startswith("v1,"))


def finished(client, task_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (body := client.get(f"/status/{task_id}").json)["status"] not in ("finished", "failed", "canceled"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return body


def drained(client, timeout: float = 30.0) -> None:
    """Until the outbox holds nothing (every delivery queued so far was delivered or dropped)."""
    deadline = time.monotonic() + timeout
    while "video_diffusion_webhooks_pending 0.0" not in client.get("/metrics").text:
        assert time.monotonic() < deadline, "the webhook outbox did not drain"
        time.sleep(0.05)


def submit(client, receiver_url: str, **params):
    response = client.post("/generate", data=upload(image_bytes(), **SMALL, webhook=receiver_url, **params),
                           headers=ASYNC)
    assert response.status_code == 202, response.json
    return response.json["task_id"]


def test_a_signed_delivery_arrives_when_the_task_ends(make_app, receivers):
    receiver = receivers()
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{receiver.port}", WEBHOOK_SECRET=SECRET).test_client()
    task_id = submit(client, receiver.url, webhook_events="started")
    status = finished(client, task_id)
    started, ended = receiver.wait_for(2)
    assert ended["at"] - time.time() < 5  # within seconds of the end
    assert json.loads(started["body"])["status"] == "started"
    assert json.loads(ended["body"]) == status  # exactly the /status JSON
    official = standardwebhooks.Webhook(SECRET)  # the specification's own Python verifier
    for delivery in (started, ended):
        assert verify(SECRET, delivery["headers"], delivery["body"])
        assert official.verify(delivery["body"], delivery["headers"]) == json.loads(delivery["body"])
        assert delivery["headers"]["content-type"] == "application/json" and delivery["path"] == "/hook"
    assert started["headers"]["webhook-id"] != ended["headers"]["webhook-id"]
    forged = dict(ended["headers"], **{"webhook-timestamp": str(int(ended["headers"]["webhook-timestamp"]) + 1)})
    assert not verify(SECRET, forged, ended["body"])
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        official.verify(ended["body"], forged)
    assert 'video_diffusion_webhook_deliveries_total{outcome="delivered"} 2.0' in client.get("/metrics").text


def test_without_a_secret_deliveries_are_unsigned_and_only_the_end_by_default(make_app, receivers):
    receiver = receivers()
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{receiver.port}").test_client()
    finished(client, submit(client, receiver.url))
    (delivery,) = receiver.wait_for(1)
    drained(client)  # the task has ended: nothing else can be queued for it
    assert len(receiver.requests) == 1 and "webhook-signature" not in delivery["headers"]
    assert delivery["headers"]["webhook-id"]


def test_a_failed_attempt_is_retried_with_the_same_id(make_app, receivers, monkeypatch):
    monkeypatch.setattr(webhooks, "RETRY_DELAYS", (2, 30, 120, 450))  # the first backoff shortened for the test
    receiver = receivers(statuses=(500,))
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{receiver.port}", WEBHOOK_SECRET=SECRET).test_client()
    finished(client, submit(client, receiver.url))
    first, second = receiver.wait_for(2, timeout=20)
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] and first["body"] == second["body"]
    assert second["at"] - first["at"] >= 1.9  # after the first backoff
    assert verify(SECRET, second["headers"], second["body"])
    deadline = time.monotonic() + 5  # the receiver records the request before its answer reaches the sender
    while 'outcome="delivered"} 1.0' not in (metrics := client.get("/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'outcome="retried"} 1.0' in metrics and 'outcome="delivered"} 1.0' in metrics


def test_a_receiver_that_never_answers_does_not_hold_up_the_next_task(make_app, receivers):
    silent = receivers(hang=20.0)
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{silent.port}").test_client()
    finished(client, submit(client, silent.url))
    assert silent.hanging.wait(10)
    response = client.post("/generate", data=upload(image_bytes(), **SMALL))  # while the receiver still hangs
    assert response.status_code == 200 and not silent.release.is_set()


def test_a_pending_delivery_survives_a_restart(make_app, receivers, generator, tmp_path, monkeypatch):
    monkeypatch.setattr(webhooks, "RETRY_DELAYS", (2, 30, 120, 450))
    receiver = receivers()
    port = receiver.port
    receiver.close()  # nobody listens: the first attempt fails and the delivery waits on disk
    first = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{port}")
    client = first.test_client()
    task_id = submit(client, f"http://127.0.0.1:{port}/hook")
    finished(client, task_id)
    deadline = time.monotonic() + 10
    while 'outcome="retried"} 1.0' not in client.get("/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first.extensions["video_diffusion"].backend.stop()
    back = receivers(port=port)  # the receiver is back, on the same port
    again = create_app(settings_for(tmp_path, WEBHOOK_ALLOW=f"127.0.0.1:{port}"), load=lambda settings: generator)
    try:
        wait_ready(again.test_client())
        (delivery,) = back.wait_for(1, timeout=20)
        assert delivery["headers"]["webhook-id"] == f"msg_{task_id}_ended"
        assert json.loads(delivery["body"])["status"] == "finished"
    finally:
        again.extensions["video_diffusion"].backend.stop()


def test_urls_outside_the_allow_list_are_refused_before_any_connection(make_app, receivers):
    allowed = receivers()
    other_port = receivers()
    other_address = receivers(host="127.0.0.2")
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{allowed.port}").test_client()
    for url in (other_port.url,  # another port
                f"http://127.0.0.2:{allowed.port}/hook",  # another loopback address, the allowed port
                other_address.url,
                f"http://127.0.0.1:{allowed.port}@127.0.0.2:{other_address.port}/hook",  # userinfo trick
                f"http://user:pw@127.0.0.1:{allowed.port}/hook",
                f"ftp://127.0.0.1:{allowed.port}/hook", "/relative", "http://"):
        response = client.post("/generate", data=upload(image_bytes(), **SMALL, webhook=url), headers=ASYNC)
        assert response.status_code == 422 and response.json["error"]["field"] == "webhook", url
    bad_events = client.post("/generate", data=upload(image_bytes(), **SMALL, webhook=allowed.url,
                                                      webhook_events="progress"), headers=ASYNC)
    assert bad_events.status_code == 422 and bad_events.json["error"]["field"] == "webhook_events"
    drained(client)
    assert "video_diffusion_tasks_created_total{" not in client.get("/metrics").text  # no task, so no delivery
    assert allowed.connections == other_port.connections == other_address.connections == 0
    closed = make_app().test_client()  # WEBHOOK_ALLOW unset: webhooks are refused
    refused = closed.post("/generate", data=upload(image_bytes(), **SMALL, webhook=allowed.url), headers=ASYNC)
    assert refused.status_code == 422 and "WEBHOOK_ALLOW" in refused.json["error"]["message"]


def test_a_redirect_is_not_followed(make_app, receivers):
    elsewhere = receivers(host="127.0.0.2")
    redirecting = receivers(statuses=(302,), location=elsewhere.url)
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{redirecting.port},127.0.0.2:{elsewhere.port}").test_client()
    finished(client, submit(client, redirecting.url))
    redirecting.wait_for(1)
    deadline = time.monotonic() + 10
    while 'outcome="dropped"} 1.0' not in client.get("/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert elsewhere.connections == 0 and len(redirecting.requests) == 1


def test_a_name_that_resolves_to_a_loopback_address_is_refused_at_delivery(make_app, receivers):
    receiver = receivers()
    client = make_app(WEBHOOK_ALLOW=f"localhost:{receiver.port}").test_client()
    finished(client, submit(client, f"http://localhost:{receiver.port}/hook"))  # the name is listed: accepted
    deadline = time.monotonic() + 10
    while 'outcome="dropped"} 1.0' not in client.get("/metrics").text:  # its address is not: dropped
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert receiver.connections == 0
    both = make_app(WEBHOOK_ALLOW=f"localhost:{receiver.port},127.0.0.1:{receiver.port},[::1]:{receiver.port}")
    client = both.test_client()
    finished(client, submit(client, f"http://localhost:{receiver.port}/hook"))
    assert receiver.wait_for(1)[0]["headers"]["host"] == f"localhost:{receiver.port}"


def test_a_cache_hit_calls_its_webhook_too(make_app, receivers):
    receiver = receivers()
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{receiver.port}").test_client()
    client.post("/generate", data=upload(image_bytes(), **SMALL, seed=5))
    hit = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=5, webhook=receiver.url), headers=ASYNC)
    assert hit.headers["X-Cache"] == "hit"
    (delivery,) = receiver.wait_for(1)
    assert json.loads(delivery["body"])["task_id"] == hit.json["task_id"]


@pytest.mark.slow
@in_lane
def test_redis_mode_deliveries_retry_and_survive_restarts(tmp_path, tiny_model_dir):
    """The worker's end puts the delivery in Redis in the same step; any API or worker sends it."""
    from conftest import RedisServer, start_worker_processes

    redis_server = RedisServer(tmp_path)
    redis_server.start()
    made: list[Receiver] = []

    def receivers(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    try:
        receiver = receivers(statuses=(500,))
        env = {"WEBHOOK_ALLOW": f"127.0.0.1:{receiver.port}", "WEBHOOK_SECRET": SECRET}
        (worker,) = start_worker_processes(tmp_path, tiny_model_dir, redis_server.url, **env)
        api = create_app(settings_for(tmp_path / "api", REDIS_URL=redis_server.url, WORKER_TTL="3", **env))
        try:
            client = api.test_client()
            task_id = submit(client, receiver.url)
            status = finished(client, task_id)
            first, second = receiver.wait_for(2, timeout=20)
            assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == f"msg_{task_id}_ended"
            assert verify(SECRET, second["headers"], second["body"]) and json.loads(second["body"]) == status

            port = receiver.port
            receiver.close()  # nobody listens; the next delivery waits in Redis
            task_id = submit(client, f"http://127.0.0.1:{port}/hook")
            finished(client, task_id)
            time.sleep(1.5)  # its first attempt fails
        finally:
            api.extensions["video_diffusion"].backend.stop()
            worker.stop()
        back = receivers(port=port)
        again = create_app(settings_for(tmp_path / "api-2", REDIS_URL=redis_server.url, WORKER_TTL="3",
                                        WEBHOOK_ALLOW=f"127.0.0.1:{port}", WEBHOOK_SECRET=SECRET))
        try:
            (delivery,) = back.wait_for(1, timeout=20)
            assert delivery["headers"]["webhook-id"] == f"msg_{task_id}_ended"
        finally:
            again.extensions["video_diffusion"].backend.stop()
    finally:
        for receiver in made:
            receiver.close()
        redis_server.stop()


def test_a_failed_claim_does_not_stop_later_deliveries(tmp_path, receivers):
    """The outbox fails once (a disk error while claiming): the supervised loop restarts and still sends."""
    from video_diffusion.backends.supervisor import Supervisor

    receiver = receivers()
    outbox = webhooks.FileOutbox(tmp_path / "outbox")
    claim, failures = outbox.claim, [OSError("the outbox could not be read")]

    def failing_once(now, limit, busy=frozenset()):
        if failures:
            raise failures.pop()
        return claim(now, limit, busy)

    outbox.claim = failing_once
    dispatcher = webhooks.Dispatcher(outbox, webhooks.parse_allow([f"127.0.0.1:{receiver.port}"]), None, None)
    supervisor = Supervisor()
    supervisor.spawn("webhooks", lambda: dispatcher.run(supervisor.stopping))
    try:
        outbox.add(webhooks.Delivery(id="msg_0_ended", task_id="0", event="ended", url=receiver.url, body="{}",
                                     next_at=time.time()))
        (delivery,) = receiver.wait_for(1, timeout=15)
        assert delivery["headers"]["webhook-id"] == "msg_0_ended" and not failures
    finally:
        supervisor.stop(5)
        dispatcher.stop()


# --- round 3: a whole-attempt deadline, one attempt per destination, a bounded outbox, IRIs ----------------------

class Trickler:
    """A receiver on 127.0.0.1 that reads the request, then sends its answer one byte every `every` seconds (at
    most 40 bytes: it ends by itself); records how long each connection stayed open."""

    def __init__(self, every: float = 1.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/slow"
        self.every, self.held = every, []
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        opened = time.monotonic()
        conn.settimeout(5)
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Padding: aaaaaaaaaaaa\r\n\r\n"[:40]:
                if self.closed.wait(self.every):
                    break
                conn.sendall(bytes([byte]))
        except OSError:
            pass  # the sender cut it off
        finally:
            self.held.append(time.monotonic() - opened)
            conn.close()

    def close(self):
        self.closed.set()
        self.sock.close()


def _dispatcher(outbox, ports, telemetry=None, **kwargs):
    from video_diffusion.backends.supervisor import Supervisor

    dispatcher = webhooks.Dispatcher(outbox, webhooks.parse_allow([f"127.0.0.1:{p}" for p in ports]), None,
                                     telemetry, **kwargs)
    supervisor = Supervisor()
    supervisor.spawn("webhooks", lambda: dispatcher.run(supervisor.stopping))
    return dispatcher, supervisor


def _delivery(name: str, url: str, at: float | None = None) -> webhooks.Delivery:
    return webhooks.Delivery(id=f"msg_{name}_ended", task_id=name, event="ended", url=url, body="{}",
                             next_at=time.time() if at is None else at)


def test_four_trickling_receivers_are_cut_off_at_the_deadline_and_a_good_one_is_served(tmp_path, receivers,
                                                                                          monkeypatch):
    """Before: the 5 s timeout was per read, so a byte every 3 s held a sender 75 s and four held all four."""
    monkeypatch.setattr(webhooks, "ATTEMPT_DEADLINE", 2.0)
    trickles = [Trickler(every=0.5) for _ in range(4)]
    good = receivers()
    outbox = webhooks.FileOutbox(tmp_path / "outbox")
    for k, trickle in enumerate(trickles):
        outbox.add(_delivery(f"slow{k}", trickle.url))
    outbox.add(_delivery("good", good.url, at=time.time() + 0.3))  # behind them in line
    dispatcher, supervisor = _dispatcher(outbox, [good.port, *(t.port for t in trickles)])
    try:
        started = time.monotonic()
        good.wait_for(1, timeout=10)
        assert time.monotonic() - started < 6  # one deadline (2 s) and a poll, not the trickles' 20 s
        deadline = time.monotonic() + 10
        while sum(len(t.held) for t in trickles) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = [h for t in trickles for h in t.held]
        assert len(held) >= 4 and max(held) < 4, held  # cut at the deadline, not after 40 bytes (20 s)
        assert outbox.pending() == 4  # the trickled ones wait for their retry
    finally:
        supervisor.stop(5)
        dispatcher.stop()
        for trickle in trickles:
            trickle.close()


def test_one_slow_destination_holds_one_sender_not_the_others_turns(tmp_path, receivers):
    slow = receivers(hang=20)
    good = receivers(host="127.0.0.2")
    outbox = webhooks.FileOutbox(tmp_path / "outbox")
    for k in range(6):  # six deliveries for the slow receiver first in line ...
        outbox.add(_delivery(f"slow{k}", slow.url, at=time.time() - 10 + k))
    outbox.add(_delivery("good", good.url))  # ... then one for another destination
    from video_diffusion.backends.supervisor import Supervisor

    dispatcher = webhooks.Dispatcher(outbox, webhooks.parse_allow([f"127.0.0.1:{slow.port}",
                                                                   f"127.0.0.2:{good.port}"]), None, None)
    supervisor = Supervisor()
    supervisor.spawn("webhooks", lambda: dispatcher.run(supervisor.stopping))
    try:
        good.wait_for(1, timeout=5)
        assert slow.hanging.wait(5) and len(slow.requests) == 1  # one attempt in flight to it, never more
    finally:
        supervisor.stop(5)
        dispatcher.stop()


def test_a_full_outbox_drops_its_oldest_and_counts_them(make_app, receivers):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens: every attempt fails and waits for its retry
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{port}", WEBHOOK_OUTBOX_MAX="3").test_client()
    for _ in range(6):
        finished(client, submit(client, f"http://127.0.0.1:{port}/hook"))
    deadline = time.monotonic() + 10
    dropped = 'video_diffusion_webhook_deliveries_total{outcome="dropped"}'
    while (pending := _metric(client, "video_diffusion_webhooks_pending")) > 3 or _metric(client, dropped) < 3:
        assert time.monotonic() < deadline, (pending, _metric(client, dropped))
        time.sleep(0.05)


def _metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def test_an_iri_is_sent_percent_encoded_and_a_control_character_is_refused(make_app, receivers):
    receiver = receivers()
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{receiver.port}").test_client()
    finished(client, submit(client, f"http://127.0.0.1:{receiver.port}/café?ü=1"))
    (delivery,) = receiver.wait_for(1)
    assert delivery["path"] == "/caf%C3%A9?%C3%BC=1"
    refused = client.post("/generate", data=upload(image_bytes(), **SMALL,
                                                   webhook=f"http://127.0.0.1:{receiver.port}/a\x7fb"),
                          headers=ASYNC)
    assert refused.status_code == 422 and refused.json["error"]["field"] == "webhook"


def test_a_delivery_that_cannot_be_sent_is_dropped_and_counted_not_retried_forever(make_app, receivers,
                                                                                   monkeypatch):
    """Before: an exception other than a network error (UnicodeEncodeError) left the delivery leased, retried
    every minute for ever, uncounted."""
    receiver = receivers()
    client = make_app(WEBHOOK_ALLOW=f"127.0.0.1:{receiver.port}").test_client()

    def broken(delivery, allowed, secret):
        raise UnicodeEncodeError("ascii", "é", 0, 1, "ordinal not in range(128)")

    monkeypatch.setattr(webhooks, "attempt", broken)
    finished(client, submit(client, receiver.url))
    drained(client)
    assert _metric(client, 'video_diffusion_webhook_deliveries_total{outcome="dropped"}') == 1


def test_health_shows_a_dispatcher_that_makes_no_progress(make_app, receivers, monkeypatch):
    monkeypatch.setattr(webhooks, "STALLED_AFTER", 1.0)
    hanging = [receivers(hang=8) for _ in range(4)]
    app = make_app(WEBHOOK_ALLOW=",".join(f"127.0.0.1:{r.port}" for r in hanging))
    client = app.test_client()
    for receiver in hanging:
        finished(client, submit(client, receiver.url))
    deadline = time.monotonic() + 10
    while client.get("/health").json["components"]["webhooks"] != "stalled":
        assert time.monotonic() < deadline, client.get("/health").json
        time.sleep(0.1)
    for receiver in hanging:
        receiver.release.set()
    deadline = time.monotonic() + 15
    while client.get("/health").json["components"]["webhooks"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_the_redis_outbox_claims_one_per_destination_and_trims_its_oldest(redis_server):
    import redis as redis_client

    from video_diffusion.backends.redis_store import RedisOutbox

    outbox = RedisOutbox(redis_client.Redis.from_url(redis_server.url))
    now = time.time()
    for k in range(3):
        outbox.add(_delivery(f"a{k}", "http://127.0.0.1:9/a", at=now - 10 + k))
    outbox.add(_delivery("b0", "http://127.0.0.2:9/b", at=now - 1))
    first = outbox.claim(now, 4)
    assert sorted(d.id for d in first) == ["msg_a0_ended", "msg_b0_ended"]
    busy = frozenset(webhooks.destination(d.url) for d in first)
    assert outbox.claim(now, 4, busy) == []  # both destinations have an attempt in flight
    assert [d.id for d in outbox.claim(now, 4, busy - {"http://127.0.0.1:9"})] == ["msg_a1_ended"]
    assert outbox.trim(3) == 1 and outbox.pending() == 3  # the oldest due one (a2) went; leased ones stay
    assert outbox.redis.get("vd:webhook:msg_a2_ended") is None


def test_webhook_bodies_point_under_the_prefix_or_public_url(make_app, receivers):
    """Before: a webhook's body carried /status/<id> without the prefix the client submitted under."""
    receiver = receivers()
    allow = f"127.0.0.1:{receiver.port}"
    prefixed = make_app(WEBHOOK_ALLOW=allow, TRUSTED_PROXIES="1").test_client()
    response = prefixed.post("/generate", data=upload(image_bytes(), **SMALL, webhook=receiver.url),
                             headers={**ASYNC, "X-Forwarded-Prefix": "/vd"})
    finished(prefixed, response.json["task_id"])
    public = make_app(WEBHOOK_ALLOW=allow, PUBLIC_URL="https://videos.example.com/vd").test_client()
    finished(public, submit(public, receiver.url))
    first, second = (json.loads(r["body"]) for r in receiver.wait_for(2))
    assert first["status_url"].startswith("/vd/status/") and first["result_url"].startswith("/vd/results/")
    assert second["status_url"].startswith("https://videos.example.com/vd/status/")
