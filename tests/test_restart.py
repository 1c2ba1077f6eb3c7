"""Embedded mode keeps every accepted task on disk: a crash loses nothing, and nothing stays `started`."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import in_lane, SMALL, Gunicorn, decode_video, image_bytes

pytestmark = pytest.mark.slow


def submit(server, **params) -> str:
    response = requests.post(server.url + "/generate", files={"image": ("i.png", image_bytes(), "image/png")},
                             data=params, headers={"Prefer": "respond-async"}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def status(server, task_id) -> dict:
    return requests.get(f"{server.url}/status/{task_id}", timeout=5).json()


@in_lane
def test_a_crash_mid_task_loses_no_accepted_task(tmp_path, tiny_model_dir):
    env = {"SVD_MODEL": str(tiny_model_dir)}
    first = Gunicorn(tmp_path, env)
    try:
        first.wait_ready()
        running = submit(first, **dict(SMALL, num_inference_steps=100))
        queued = [submit(first, **SMALL), submit(first, **SMALL)]
        deadline = time.monotonic() + 30
        while status(first, running)["progress"]["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status(first, running)["status"] == "started"
    finally:
        first.kill()

    second = Gunicorn(tmp_path, env)
    try:
        second.wait_ready()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [status(second, t)["status"] for t in [running, *queued]]
            if all(s in ("finished", "failed", "canceled") for s in states):
                break
            time.sleep(0.1)
        crashed = status(second, running)
        assert crashed["status"] == "failed" and crashed["error"]["code"] == "interrupted"
        for task_id in queued:
            assert status(second, task_id)["status"] == "finished"
            video = requests.get(f"{second.url}/results/{task_id}", timeout=10)
            assert video.status_code == 200
            assert decode_video(video.content, "mp4")[0].shape == (14, 64, 64, 3)
    finally:
        second.stop()
