"""Crash safety: SIGKILL at random points while async tasks run, on both backends; after the restarts every
accepted task ends (finished, failed or canceled) and every finished one downloads. `make test` runs a short
version; `make soak` runs 50 tasks with more kills (SOAK_CRASH_TASKS, SOAK_CRASH_KILLS)."""

from __future__ import annotations

import os
import random
import time

import pytest
import requests

from conftest import in_lane, SMALL, Gunicorn, RedisServer, decode_video, image_bytes, start_worker_processes

pytestmark = pytest.mark.slow

TASKS = int(os.environ.get("SOAK_CRASH_TASKS", "6"))
KILLS = int(os.environ.get("SOAK_CRASH_KILLS", "1"))
TERMINAL = ("finished", "failed", "canceled")


def _submit(url: str) -> str | None:
    try:
        response = requests.post(url + "/generate", files={"image": ("i.png", image_bytes(), "image/png")},
                                 data=SMALL, headers={"Prefer": "respond-async"}, timeout=10)
    except requests.ConnectionError:
        return None  # the service is down this moment: the client was told nothing was accepted
    return response.json()["task_id"] if response.status_code == 202 else None


def _run(url_of, kill_and_restart, seed: int) -> tuple[list[str], int]:
    """Submit TASKS tasks, killing at KILLS random submissions (and after a random delay); the accepted ids."""
    rng = random.Random(seed)
    kill_at = set(rng.sample(range(TASKS), KILLS))
    accepted, kills = [], 0
    for index in range(TASKS):
        task_id = _submit(url_of())
        if task_id:
            accepted.append(task_id)
        if index in kill_at:
            time.sleep(rng.uniform(0.0, 1.5))  # mid-task, between tasks, while saving: wherever it lands
            kill_and_restart()
            kills += 1
    return accepted, kills


def _report(label: str, accepted: list[str], counts: dict[str, int]) -> None:
    print(f"SOAK {label} | {len(accepted)} | {counts['finished']} | {counts['failed']} | {counts['canceled']} | 0 | 0")


def _check_every_task_ended(url: str, accepted: list[str], timeout: float = 120.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        bodies = {t: requests.get(f"{url}/status/{t}", timeout=10).json() for t in accepted}
        if all(b.get("status") in TERMINAL for b in bodies.values()):
            break
        assert time.monotonic() < deadline, {t: b.get("status") for t, b in bodies.items()}
        time.sleep(0.2)
    counts = {status: 0 for status in TERMINAL}
    for task_id, body in bodies.items():
        counts[body["status"]] += 1
        if body["status"] == "finished":
            video = requests.get(f"{url}/results/{task_id}", timeout=10)
            assert video.status_code == 200
            assert decode_video(video.content, "mp4")[0].shape == (14, 64, 64, 3)
    return counts


@in_lane
def test_embedded_sigkill_at_random_points_loses_no_accepted_task(tmp_path, tiny_model_dir):
    env = {"SVD_MODEL": str(tiny_model_dir), "MAX_QUEUE": str(TASKS + 1)}
    server = [Gunicorn(tmp_path / "run-0", {**env, "VIDEO_OUTPUT_PATH": str(tmp_path / "videos")})]
    server[0].wait_ready()

    def kill_and_restart():
        server[0].kill()
        server[0] = Gunicorn(tmp_path / f"run-{len(server) + time.monotonic_ns()}",
                             {**env, "VIDEO_OUTPUT_PATH": str(tmp_path / "videos")})
        server[0].wait_ready()

    try:
        accepted, kills = _run(lambda: server[0].url, kill_and_restart, seed=TASKS)
        assert kills == KILLS and len(accepted) >= TASKS - KILLS
        counts = _check_every_task_ended(server[0].url, accepted)
        assert counts["finished"] >= 1, counts
        _report(f"embedded, {kills} SIGKILLs of the service", accepted, counts)
    finally:
        server[0].stop()


@in_lane
def test_redis_workers_sigkilled_at_random_points_lose_no_accepted_task(tmp_path, tiny_model_dir):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    api = Gunicorn(tmp_path / "api", {"REDIS_URL": redis_server.url, "WORKER_TTL": "3",
                                      "MAX_QUEUE": str(TASKS + 1), "GENERATE_MODE": "async"})
    workers = start_worker_processes(tmp_path, tiny_model_dir, redis_server.url, count=1)
    api.wait_ready()

    def kill_and_restart():
        workers[-1].process.kill()
        workers[-1].process.wait()
        workers.extend(start_worker_processes(tmp_path, tiny_model_dir, redis_server.url, count=1))

    try:
        accepted, kills = _run(lambda: api.url, kill_and_restart, seed=TASKS + 1)
        assert kills == KILLS and len(accepted) == TASKS
        counts = _check_every_task_ended(api.url, accepted)
        assert counts["finished"] >= 1, counts
        _report(f"Redis, {kills} SIGKILLs of a worker", accepted, counts)
    finally:
        api.stop()
        for worker in workers:
            worker.stop()
        redis_server.stop()
