"""Scale-out mode: the API enqueues on Redis, real `python worker.py` processes run the tasks."""

from __future__ import annotations

import base64
import io
import json
import re
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import redis
import requests

from conftest import (ROOT, SMALL, RedisServer, in_lane, SteppedClock, decode_video, image_bytes, promtool_problems, settings_for,
                      start_worker_processes, upload)
from server import create_app
from test_async import LONG, ended, poll, running, submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """One Redis and one worker for the flow tests (a worker takes seconds to start: torch, the model)."""
    folder = tmp_path_factory.mktemp("redis-shared")
    server = RedisServer(folder)
    server.start()
    (worker,) = start_worker_processes(folder, tiny_model_dir, server.url)
    yield server, worker
    worker.stop()
    server.stop()


def make_api(tmp_path, url: str, clock=None, **env):
    app = create_app(settings_for(tmp_path, **{"REDIS_URL": url, "WORKER_TTL": "3", **env}), clock=clock)
    return app, app.test_client()


@pytest.fixture
def api(tmp_path, shared):
    """The API in Redis mode (it loads no model), on the shared Redis and its worker."""
    app, client = make_api(tmp_path, shared[0].url)
    yield client
    app.extensions["video_diffusion"].backend.stop()


@pytest.fixture
def lonely_api(tmp_path, shared):
    """The API on a Redis database no worker listens to."""
    app, client = make_api(tmp_path, shared[0].url.rsplit("/", 1)[0] + "/5")
    yield client
    app.extensions["video_diffusion"].backend.stop()


@pytest.fixture
def own_api(tmp_path, redis_server):
    """The API on this test's own Redis, for tests that kill workers or Redis."""
    app, client = make_api(tmp_path, redis_server.url)
    yield client
    app.extensions["video_diffusion"].backend.stop()


def test_the_api_process_imports_no_torch(shared):
    code = ("import sys; from config import load_settings; from server import create_app; "
            f"app = create_app(load_settings({{'REDIS_URL': '{shared[0].url}'}}, dotenv_path=None)); "
            "print(app.test_client().get('/health').json['mode'], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["redis", "False"]


def test_health_needs_a_ready_worker(api, lonely_api):
    alone = lonely_api.get("/health")
    assert alone.status_code == 503 and alone.json["status"] == "no_workers" and alone.json["redis"] == "ok"
    served = api.get("/health")
    assert served.status_code == 200 and served.json["workers"] == 1
    assert "random weights" in served.json["model"] and served.json["noise"] is True


def test_async_flow_through_a_worker(api, shared):
    worker = shared[1]
    completed_before = _completed(worker)
    cluster_before = api.get("/metrics").get_data(as_text=True)
    response = submit(api, **dict(SMALL, num_inference_steps=12, seed=5))
    assert response.status_code == 202
    task_id = response.json["task_id"]
    seen = []
    final = poll(api, task_id, ended, seen=seen)
    assert final["status"] == "finished", final
    assert any(b["status"] == "started" and 0 < b["progress"]["step"] < 12 for b in seen)
    assert final["params"]["num_frames"] == 14 and final["params"]["width"] == 64
    video = api.get(final["result_url"])
    assert video.status_code == 200 and video.headers["X-Seed"] == "5"
    assert int(video.headers["Content-Length"]) == len(video.data)
    assert decode_video(video.data, "mp4")[0].shape == (14, 64, 64, 3)

    api_metrics = api.get("/metrics").get_data(as_text=True)
    assert "video_diffusion_workers_live 1.0" in api_metrics and "video_diffusion_queue_depth 0.0" in api_metrics
    assert 'video_diffusion_tasks_created_total{mode="async"} 1.0' in api_metrics
    assert _completed(worker) == completed_before + 1
    # The API loads no model, runs nothing, and still reports the work its workers did (kept in Redis).
    for series in ("video_diffusion_tasks_completed_total", "video_diffusion_generation_seconds_count",
                   "video_diffusion_queue_wait_seconds_count", 'video_diffusion_encoding_seconds_bucket{le="+Inf"}'):
        assert sample(api_metrics, series) == sample(cluster_before, series) + 1, series
    assert sample(api_metrics, "video_diffusion_generation_seconds_sum") > sample(cluster_before,
                                                                                  "video_diffusion_generation_seconds_sum")
    worker_metrics = requests.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text
    assert promtool_problems(api_metrics) == "" and promtool_problems(worker_metrics) == ""
    assert not re.search(r"^\w+_created[{ ]", api_metrics + worker_metrics, re.M)
    assert "video_diffusion_model_ready 1.0" in worker_metrics
    assert "video_diffusion_generation_seconds_count" in worker_metrics


def _completed(worker) -> float:
    text = requests.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text
    return sample(text, "video_diffusion_tasks_completed_total")


def sample(text: str, series: str) -> float:
    """The value of one series (name and labels as written) in a Prometheus text exposition; 0 if absent."""
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)


def test_the_heartbeat_names_the_workers_metrics_port(shared):
    server, worker = shared
    beat = json.loads(worker.find_heartbeat(redis.Redis.from_url(server.url)))
    assert beat["metrics_port"] == worker.metrics_port


def test_a_workers_metrics_server_binds_host_takes_the_key_and_answers_head(tmp_path):
    """The server `worker.py` runs, with real sockets: HOST, the API key, HEAD, JSON errors, a taken port."""
    import threading

    from prometheus_client import CollectorRegistry, Counter

    from video_diffusion.web import worker_metrics

    registry = CollectorRegistry()
    Counter("probe", "A test counter.", registry=registry).inc()
    settings = settings_for(tmp_path, HOST="127.0.0.1", WORKER_METRICS_PORT="0", API_KEY="k1,k2")
    first = worker_metrics.serve(settings, registry)
    # The port it got, taken: a second worker asking for it is given another.
    second = worker_metrics.serve(settings_for(tmp_path, HOST="127.0.0.1", WORKER_METRICS_PORT=str(first.server_port),
                                               METRICS_PUBLIC="true"), registry)
    servers = [first, second]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert first.server_address[0] == "127.0.0.1" and second.server_port not in (0, first.server_port)
        url = f"http://127.0.0.1:{first.server_port}"
        refused = requests.get(url + "/metrics", timeout=5)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        shown = requests.get(url + "/metrics", headers={"Authorization": "Bearer k2"}, timeout=5)
        assert shown.status_code == 200 and "probe_total 1.0" in shown.text and "probe_created" not in shown.text
        head = requests.head(url + "/metrics", headers={"X-API-Key": "k1"}, timeout=5)
        assert head.status_code == 200 and head.content == b"" and head.headers["Content-Type"].startswith("text/plain")
        wrong = requests.post(url + "/metrics", headers={"X-API-Key": "k1"}, timeout=5)
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
        assert requests.get(url + "/nothing", timeout=5).json()["error"]["code"] == "not_found"
        assert requests.get(url + "/livez", timeout=5).json() == {"status": "ok"}  # for the compose healthcheck
        public = requests.get(f"http://127.0.0.1:{second.server_port}/metrics", timeout=5)
        assert public.status_code == 200 and "probe_total 1.0" in public.text  # METRICS_PUBLIC
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_sync_call_waits_for_the_worker_and_returns_the_video(api, lonely_api):
    refused = lonely_api.post("/generate", data=upload(image_bytes(), **SMALL))
    assert refused.status_code == 503 and refused.json["error"]["code"] == "model_not_ready"
    response = api.post("/generate", data=upload(image_bytes(), format="webm", **SMALL))
    assert response.status_code == 200 and response.headers["Content-Type"] == "video/webm"
    assert decode_video(response.data, "webm")[0].shape == (14, 64, 64, 3)


def test_cancel_queued_and_running_and_expiry(tmp_path, shared):
    clock = SteppedClock()
    app, client = make_api(tmp_path, shared[0].url, RESULT_TTL="2", clock=clock)
    canceled_before = sample(client.get("/metrics").get_data(as_text=True), "video_diffusion_tasks_canceled_total")
    first = submit(client, **LONG).json["task_id"]
    poll(client, first, running)
    second = submit(client, **SMALL).json["task_id"]
    assert client.get(f"/status/{second}").json["queue_position"] == 1
    assert client.delete(f"/tasks/{second}").json["status"] == "canceled"
    assert client.delete(f"/tasks/{first}").status_code == 202
    final = poll(client, first, ended)
    assert final["status"] == "canceled" and final["progress"]["step"] < 100
    assert client.get(f"/status/{second}").json["started_at"] is None
    # One canceled by the API while queued, one by its worker while running: both in the cluster's count.
    canceled = sample(client.get("/metrics").get_data(as_text=True), "video_diffusion_tasks_canceled_total")
    assert canceled == canceled_before + 2

    done = submit(client, prefer="wait", **SMALL).headers["X-Task-Id"]
    assert client.get(f"/results/{done}").status_code == 200
    clock.advance(2.2)
    assert client.get(f"/results/{done}").status_code == 410
    assert client.get(f"/results/{'0' * 32}").status_code == 404
    app.extensions["video_diffusion"].backend.stop()


@in_lane
def test_a_killed_worker_fails_its_task_and_sigterm_lets_a_job_finish(tmp_path, tiny_model_dir):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    app, api = make_api(tmp_path, redis_server.url)
    workers = start_worker_processes(tmp_path, tiny_model_dir, redis_server.url, 2, WORKER_METRICS_PORT="0",
                                     HOST="127.0.0.1")
    try:
        # Two workers on one host, each on a free metrics port its heartbeat names.
        connection = redis.Redis.from_url(redis_server.url)
        ports = [json.loads(w.find_heartbeat(connection))["metrics_port"] for w in workers]
        assert len(set(ports)) == 2 and 0 not in ports
        for port in ports:
            assert "video_diffusion_model_ready 1.0" in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        task_id = submit(api, **LONG).json["task_id"]
        poll(api, task_id, running)
        victim = next(w for w in workers if w.name == _worker_of(api, task_id))
        os.kill(victim.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        final = poll(api, task_id, ended, timeout=15)
        assert final["status"] == "failed" and final["error"]["code"] == "abandoned"
        assert time.monotonic() - killed_at < 3 + 2  # WORKER_TTL=3 plus a poll

        # The other worker carries on; SIGTERM while it runs a job lets that job finish, then it exits.
        (survivor,) = [w for w in workers if w is not victim]
        task_id = submit(api, **dict(SMALL, num_inference_steps=40)).json["task_id"]
        poll(api, task_id, running)
        assert _worker_of(api, task_id) == survivor.name
        survivor.process.send_signal(signal.SIGTERM)
        final = poll(api, task_id, ended, timeout=60)
        assert final["status"] == "finished", final
        assert survivor.process.wait(30) == 0
        assert api.get(f"/results/{task_id}").status_code == 200
        # One scrape of the API counts both: the task a worker finished, and the one the reaper failed.
        metrics = api.get("/metrics").get_data(as_text=True)
        assert sample(metrics, "video_diffusion_tasks_completed_total") == 1
        assert sample(metrics, 'video_diffusion_tasks_failed_total{code="abandoned"}') == 1
        assert sample(metrics, "video_diffusion_queue_wait_seconds_count") == 2
    finally:
        app.extensions["video_diffusion"].backend.stop()
        for worker in workers:
            worker.stop()
        redis_server.stop()


def _worker_of(client, task_id) -> str:
    backend = client.application.extensions["video_diffusion"].backend
    return backend.store.load(task_id).worker


def test_redis_down_answers_503_fast_and_everything_recovers(own_api, redis_server, start_workers):
    api = own_api
    start_workers(1)
    assert api.get("/health").status_code == 200
    redis_server.stop()
    for call in (lambda: api.post("/generate", data=upload(image_bytes(), **SMALL)),
                 lambda: submit(api, **SMALL), lambda: api.get(f"/status/{'0' * 32}")):
        started = time.monotonic()
        response = call()
        assert time.monotonic() - started < 5
        assert response.status_code == 503 and response.json["error"]["code"] == "redis_unavailable"
    health = api.get("/health")
    assert health.status_code == 503 and "unreachable" in health.json["redis"]

    redis_server.start()
    deadline = time.monotonic() + 30
    while api.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert api.get("/health").status_code == 200  # the worker is back without a restart
    final = poll(api, submit(api, **SMALL).json["task_id"], ended, timeout=60)
    assert final["status"] == "finished"


def test_post_steps_json_and_the_result_cache_through_a_worker(api, shared, tmp_path):
    """Segments, loop and output_fps run on the worker; the JSON answer and the result cache work through Redis,
    and a hit goes when the video it points at goes."""
    params = dict(SMALL, seed=71, segments=2, loop="pingpong", output_fps=12, format="frames")
    first = api.post("/generate", data=upload(image_bytes(), **params))
    assert first.status_code == 200 and first.headers["X-Cache"] == "miss"
    assert len(zipfile.ZipFile(io.BytesIO(first.data)).namelist()) == 2 * (2 * (2 * 14 - 1) - 2)
    completed = _completed(shared[1])
    hit = api.post("/generate", data=upload(image_bytes(), **params), headers={"Accept": "application/json"})
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "hit"
    assert base64.b64decode(hit.json["video"]) == first.data and hit.json["finish_reason"] == "SUCCESS"
    assert _completed(shared[1]) == completed  # the worker made nothing
    assert api.post("/generate", data=upload(image_bytes(), **{**params, "seed": 72})).headers["X-Cache"] == "miss"

    clock = SteppedClock()
    app, short = make_api(tmp_path, shared[0].url, RESULT_TTL="7", clock=clock)  # an API whose videos live 7 s
    try:
        made = short.post("/generate", data=upload(image_bytes(), **dict(SMALL, seed=73)))
        repeat = short.post("/generate", data=upload(image_bytes(), **dict(SMALL, seed=73)))
        assert repeat.headers["X-Cache"] == "hit" and repeat.data == made.data
        clock.advance(7.2)
        assert short.get(f"/results/{repeat.headers['X-Task-Id']}").status_code == 410
        # Asked async: a sync answer would be judged by this API's clock, moved past the new video's RESULT_TTL too.
        again = short.post("/generate", data=upload(image_bytes(), **dict(SMALL, seed=73)),
                           headers={"Prefer": "respond-async"})
        assert again.status_code == 202 and again.headers["X-Cache"] == "miss"
    finally:
        app.extensions["video_diffusion"].backend.stop()
