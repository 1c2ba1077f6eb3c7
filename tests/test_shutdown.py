"""SIGTERM to gunicorn: drain (503s at once), finish the running task, keep queued tasks for the next start."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import in_lane, SMALL, Gunicorn, image_bytes

pytestmark = pytest.mark.slow


def post(server, prefer, **params):
    return requests.post(server.url + "/generate", files={"image": ("i.png", image_bytes(), "image/png")},
                         data=params, headers={"Prefer": prefer}, timeout=60)


@in_lane
def test_sigterm_drains_finishes_the_running_task_and_keeps_the_queue(tmp_path, tiny_model_dir):
    env = {"SVD_MODEL": str(tiny_model_dir)}
    server = Gunicorn(tmp_path, env)
    try:
        server.wait_ready()
        running = post(server, "respond-async", **dict(SMALL, num_inference_steps=40)).json()["task_id"]
        queued = post(server, "respond-async", **SMALL).json()["task_id"]
        with ThreadPoolExecutor(1) as pool:
            waiting_sync = pool.submit(post, server, "wait", **SMALL)
            deadline = time.monotonic() + 20
            while requests.get(server.url + "/health", timeout=5).json()["waiting"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            health = requests.get(server.url + "/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            assert requests.get(server.url + "/livez", timeout=5).status_code == 200
            refused = post(server, "respond-async", **SMALL)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            sync = waiting_sync.result()
            assert sync.status_code == 503 and sync.json()["error"]["code"] == "shutting_down"
        assert server.process.wait(60) == 0
    finally:
        server.stop()

    record = json.loads((server.output / running / "task.json").read_text())
    assert record["status"] == "finished" and record["step"] == 40
    assert json.loads((server.output / queued / "task.json").read_text())["status"] == "queued"

    restarted = Gunicorn(tmp_path, env)
    try:
        restarted.wait_ready()
        deadline = time.monotonic() + 30
        while requests.get(f"{restarted.url}/status/{queued}", timeout=5).json()["status"] != "finished":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert requests.get(f"{restarted.url}/results/{running}", timeout=5).status_code == 200
    finally:
        restarted.stop()


@in_lane
def test_ctrl_c_drains_like_sigterm_and_a_second_one_stops_at_once_recording_the_task(tmp_path, tiny_model_dir):
    """Before: Ctrl-C (SIGINT to the foreground group) closed the port at once, then waited silently for the
    running generation; some runs aborted (`terminate called without an active exception`); a second Ctrl-C
    printed a SystemExit traceback."""
    import os

    server = Gunicorn(tmp_path, {"SVD_MODEL": str(tiny_model_dir)})
    try:
        server.wait_ready()
        running = post(server, "respond-async", **dict(SMALL, num_inference_steps=100)).json()["task_id"]
        deadline = time.monotonic() + 20
        while requests.get(server.url + "/health", timeout=5).json()["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        group = os.getpgid(server.process.pid)
        os.killpg(group, signal.SIGINT)  # what a terminal sends to the foreground group
        time.sleep(0.5)
        health = requests.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        os.killpg(group, signal.SIGINT)
        assert server.process.wait(15) == 0
    finally:
        server.stop()
    logs = server.logs()
    assert logs.count("finishing the running task; Ctrl-C again to stop now") == 1, logs[-3000:]
    assert "Traceback" not in logs and "terminate called" not in logs, logs[-3000:]
    record = json.loads((server.output / running / "task.json").read_text())
    assert record["status"] == "failed" and record["error"]["code"] == "interrupted", record
