"""Scale-out mode: the API enqueues on Redis, real `python worker.py` processes run the tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import ROOT, SMALL, decode_video, image_bytes, settings_for, upload
from server import create_app
from test_async import LONG, ended, poll, running, submit

pytestmark = pytest.mark.slow


@pytest.fixture
def api(tmp_path, redis_server):
    """The API in Redis mode (it loads no model)."""
    app = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, WORKER_TTL="3"))
    yield app.test_client()
    app.extensions["video_diffusion"].backend.stop()


def test_the_api_process_imports_no_torch(redis_server):
    code = ("import sys; from config import load_settings; from server import create_app; "
            f"app = create_app(load_settings({{'REDIS_URL': '{redis_server.url}'}}, dotenv_path=None)); "
            "print(app.test_client().get('/health').json['mode'], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["redis", "False"]


def test_health_needs_a_ready_worker(api, start_workers):
    before = api.get("/health")
    assert before.status_code == 503 and before.json["status"] == "no_workers" and before.json["redis"] == "ok"
    start_workers(1)
    after = api.get("/health")
    assert after.status_code == 200 and after.json["workers"] == 1
    assert "random weights" in after.json["model"]


def test_async_flow_through_a_worker(api, start_workers):
    (worker,) = start_workers(1)
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
    worker_metrics = requests.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text
    assert "video_diffusion_tasks_completed_total 1.0" in worker_metrics
    assert "video_diffusion_generation_seconds_count 1.0" in worker_metrics
    assert "video_diffusion_model_ready 1.0" in worker_metrics


def test_sync_call_waits_for_the_worker_and_returns_the_video(api, start_workers):
    refused = api.post("/generate", data=upload(image_bytes(), **SMALL))
    assert refused.status_code == 503 and refused.json["error"]["code"] == "model_not_ready"
    start_workers(1)
    response = api.post("/generate", data=upload(image_bytes(), format="webm", **SMALL))
    assert response.status_code == 200 and response.headers["Content-Type"] == "video/webm"
    assert decode_video(response.data, "webm")[0].shape == (14, 64, 64, 3)


def test_cancel_queued_and_running_and_expiry(tmp_path, redis_server, start_workers):
    app = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, RESULT_TTL="2"))
    client = app.test_client()
    start_workers(1)
    first = submit(client, **LONG).json["task_id"]
    poll(client, first, running)
    second = submit(client, **SMALL).json["task_id"]
    assert client.get(f"/status/{second}").json["queue_position"] == 1
    assert client.delete(f"/tasks/{second}").json["status"] == "canceled"
    assert client.delete(f"/tasks/{first}").status_code == 202
    final = poll(client, first, ended)
    assert final["status"] == "canceled" and final["progress"]["step"] < 100
    assert client.get(f"/status/{second}").json["started_at"] is None

    done = submit(client, prefer="wait", **SMALL).headers["X-Task-Id"]
    assert client.get(f"/results/{done}").status_code == 200
    time.sleep(2.2)
    assert client.get(f"/results/{done}").status_code == 410
    assert client.get(f"/results/{'0' * 32}").status_code == 404


def test_a_killed_worker_fails_its_task_and_the_others_carry_on(api, start_workers):
    workers = start_workers(2)
    task_id = submit(api, **LONG).json["task_id"]
    poll(api, task_id, running)
    victim = next(w for w in workers if w.name == _worker_of(api, task_id))
    os.kill(victim.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    final = poll(api, task_id, ended, timeout=15)
    assert final["status"] == "failed" and final["error"]["code"] == "abandoned"
    assert time.monotonic() - killed_at < 3 + 2  # WORKER_TTL=3 plus a poll
    after = submit(api, prefer="wait", **SMALL)
    assert after.status_code == 200


def _worker_of(client, task_id) -> str:
    backend = client.application.extensions["video_diffusion"].backend
    return backend.load(task_id).worker


def test_sigterm_lets_the_running_job_finish(api, start_workers):
    (worker,) = start_workers(1)
    task_id = submit(api, **dict(SMALL, num_inference_steps=40)).json["task_id"]
    poll(api, task_id, running)
    worker.process.send_signal(signal.SIGTERM)
    final = poll(api, task_id, ended, timeout=60)
    assert final["status"] == "finished", final
    assert worker.process.wait(30) == 0
    assert api.get(f"/results/{task_id}").status_code == 200


def test_redis_down_answers_503_fast_and_everything_recovers(api, redis_server, start_workers):
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
