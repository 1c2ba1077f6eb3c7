"""Webhooks: signed deliveries to a receiver on the loopback, retries, restarts, and the allow list.

Every receiver here listens on 127.0.0.1 or 127.0.0.2 (loopback) and every handler's wait is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from video_diffusion.delivery import webhooks
from conftest import SMALL, image_bytes, settings_for, upload, wait_ready
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
    for delivery in (started, ended):
        assert verify(SECRET, delivery["headers"], delivery["body"])
        assert delivery["headers"]["content-type"] == "application/json" and delivery["path"] == "/hook"
    assert started["headers"]["webhook-id"] != ended["headers"]["webhook-id"]
    forged = dict(ended["headers"], **{"webhook-timestamp": str(int(ended["headers"]["webhook-timestamp"]) + 1)})
    assert not verify(SECRET, forged, ended["body"])
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
    metrics = client.get("/metrics").text
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
def test_redis_mode_deliveries_retry_and_survive_restarts(tmp_path, tiny_model_dir, redis_server, receivers):
    """The worker's end puts the delivery in Redis in the same step; any API or worker sends it."""
    from conftest import start_worker_processes

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


def test_a_failed_claim_does_not_stop_later_deliveries(tmp_path, receivers):
    """The outbox fails once (a disk error while claiming): the supervised loop restarts and still sends."""
    from video_diffusion.backends.supervisor import Supervisor

    receiver = receivers()
    outbox = webhooks.FileOutbox(tmp_path / "outbox")
    claim, failures = outbox.claim, [OSError("the outbox could not be read")]

    def failing_once(now, limit):
        if failures:
            raise failures.pop()
        return claim(now, limit)

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
