"""Idempotency-Key: a retried submit gets the task its first try made, never a second one (both backends)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from conftest import in_lane, SMALL, image_bytes, settings_for, start_worker_processes, upload, wait_ready
from server import create_app
from video_diffusion.lifecycle.record import is_task_id
from test_postprocess import Recording

ASYNC = {"Prefer": "respond-async"}


def post(client, key: str, prefer_async: bool = True, **params):
    headers = {"Idempotency-Key": key, **(ASYNC if prefer_async else {})}
    image = params.pop("image", image_bytes())
    return client.post("/generate", data=upload(image, **{**SMALL, **params}), headers=headers)


def records(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if is_task_id(p.name) and (p / "task.json").exists()]


def test_two_sequential_submits_with_one_key_make_one_task(make_app, tmp_path):
    client = make_app().test_client()
    first, second = post(client, "order-1"), post(client, "order-1")
    assert first.status_code == second.status_code == 202
    assert first.json["task_id"] == second.json["task_id"]
    assert "Idempotent-Replayed" not in first.headers and second.headers["Idempotent-Replayed"] == "true"
    assert records(tmp_path / "videos") == [first.json["task_id"]]


def test_two_concurrent_submits_with_one_key_make_one_task(make_app, tmp_path):
    client = make_app().test_client()
    answers = []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait(5)
        answers.append(post(client, "order-2"))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 2
    ids = {a.json["task_id"] for a in answers if a.status_code == 202}
    conflicts = [a for a in answers if a.status_code == 409]
    assert len(ids) == 1 and all(a.headers["Retry-After"] for a in conflicts)
    assert records(tmp_path / "videos") == list(ids)


def test_a_different_request_with_the_same_key_is_422(make_app):
    client = make_app().test_client()
    assert post(client, "order-3").status_code == 202
    for changed in ({"fps": 7}, {"image": image_bytes(color=(0, 0, 255))}):
        response = post(client, "order-3", **changed)
        assert response.status_code == 422 and response.json["error"]["code"] == "idempotency_key_reused"


def test_a_synchronous_retry_gets_the_same_video_without_generating_again(make_app, generator):
    recording = Recording(generator)
    client = make_app(load=lambda settings: recording).test_client()
    first, again = post(client, "sync-1", prefer_async=False), post(client, "sync-1", prefer_async=False)
    assert first.status_code == again.status_code == 200 and first.data == again.data
    assert first.headers["X-Task-Id"] == again.headers["X-Task-Id"] and len(recording.calls) == 1


def test_a_refused_submit_leaves_the_key_free(make_app, tmp_path):
    client = make_app().test_client()
    refused = post(client, "order-4", fps=99)
    assert refused.status_code == 422 and refused.json["error"]["field"] == "fps"
    accepted = post(client, "order-4")
    assert accepted.status_code == 202 and records(tmp_path / "videos") == [accepted.json["task_id"]]


def test_keys_are_scoped_per_api_key(make_app):
    client = make_app(API_KEY="alpha,beta").test_client()

    def as_(key):
        return client.post("/generate", data=upload(image_bytes(), **SMALL),
                           headers={"Idempotency-Key": "same", "Authorization": f"Bearer {key}", **ASYNC})

    alpha, beta, alpha_again = as_("alpha"), as_("beta"), as_("alpha")
    assert alpha.json["task_id"] != beta.json["task_id"] and alpha_again.json["task_id"] == alpha.json["task_id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9"])
def test_a_malformed_key_is_422(client, key):
    response = client.post("/generate", data=upload(image_bytes(), **SMALL),
                           headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1"), **ASYNC})
    assert response.status_code == 422 and response.json["error"]["field"] == "Idempotency-Key"


def test_keys_survive_a_restart(make_app, generator, tmp_path):
    first_app = make_app()
    first = post(first_app.test_client(), "order-5")
    first_app.extensions["video_diffusion"].backend.stop()
    again = create_app(settings_for(tmp_path), load=lambda settings: generator)
    try:
        client = again.test_client()
        wait_ready(client)
        replay = post(client, "order-5")
        assert replay.json["task_id"] == first.json["task_id"] and replay.headers["Idempotent-Replayed"] == "true"
        assert post(client, "order-5", fps=8).status_code == 422
    finally:
        again.extensions["video_diffusion"].backend.stop()


@pytest.mark.slow
def test_redis_mode_one_task_per_key_across_api_processes_and_restarts(tmp_path, tiny_model_dir, redis_server):
    workers = start_worker_processes(tmp_path, tiny_model_dir, redis_server.url)
    apps = [create_app(settings_for(tmp_path / f"api-{i}", REDIS_URL=redis_server.url, WORKER_TTL="3"))
            for i in range(2)]
    try:
        clients = [app.test_client() for app in apps]
        answers = []
        barrier = threading.Barrier(2)

        def run(client):
            barrier.wait(5)
            answers.append(post(client, "redis-1"))

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]  # two API processes' worth
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        ids = {a.json["task_id"] for a in answers if a.status_code == 202}
        assert len(ids) == 1 and all(a.status_code in (202, 409) for a in answers)
        sequential = post(clients[1], "redis-1")
        assert sequential.json["task_id"] in ids
        assert post(clients[0], "redis-1", fps=9).json["error"]["code"] == "idempotency_key_reused"
        connection = redis.Redis.from_url(redis_server.url)
        assert len(connection.keys("vd:task:*")) == 1
        restarted = create_app(settings_for(tmp_path / "api-3", REDIS_URL=redis_server.url, WORKER_TTL="3"))
        apps.append(restarted)
        assert post(restarted.test_client(), "redis-1").json["task_id"] in ids
        assert len(connection.keys("vd:task:*")) == 1
    finally:
        for app in apps:
            app.extensions["video_diffusion"].backend.stop()
        for worker in workers:
            worker.stop()


@pytest.mark.slow
@in_lane
def test_a_sync_retry_after_losing_redis_gets_the_first_task(tmp_path, tiny_model_dir):
    """The case that asked for keys: a synchronous client got 503 while Redis was down, its task ran on; the retry
    with the same key, once Redis is back with its data, gets that task and no second task exists. (The retry asks
    for the task id, not the video: waiting for the worker to reconnect and finish adds half a minute and nothing
    about the key; a synchronous replay is tested above.)"""
    from conftest import RedisServer

    long = {"num_inference_steps": 100}  # still running when Redis goes (the retry does not wait for it)

    server = RedisServer(tmp_path, persist=True)
    server.start()
    workers = start_worker_processes(tmp_path, tiny_model_dir, server.url)
    app = create_app(settings_for(tmp_path / "api", REDIS_URL=server.url, WORKER_TTL="3"))
    try:
        client = app.test_client()
        result = {}
        thread = threading.Thread(
            target=lambda: result.update(response=post(client, "lost-1", prefer_async=False, **long)))
        thread.start()
        connection = redis.Redis.from_url(server.url)
        for _ in range(300):  # until the worker has started it: then the client is surely still waiting
            records = [connection.get(key) for key in connection.keys("vd:task:*")]
            if any(b'"status": "started"' in r for r in records if r):
                break
            threading.Event().wait(0.05)
        server.stop()  # a fault where the issue saw it: Redis gone while the client waits
        thread.join(30)
        lost = result["response"]
        assert lost.status_code == 503 and lost.json["error"]["code"] == "redis_unavailable"
        server.start()  # back, with its data
        retry = post(client, "lost-1", **long)
        assert retry.status_code == 202 and retry.json["task_id"] == lost.json["task_id"]
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert len(redis.Redis.from_url(server.url).keys("vd:task:*")) == 1
    finally:
        app.extensions["video_diffusion"].backend.stop()
        for worker in workers:
            worker.stop()
        server.stop()


def test_sync_replays_of_a_running_task_take_places_in_line_and_never_park_every_thread(make_app):
    """Before: replays skipped admission; 60 concurrent sync replays of one key parked every request thread and
    /status timed out. Now a waiting replay holds a place in line: beyond MAX_QUEUE, 503 queue_full at once."""
    from concurrent.futures import ThreadPoolExecutor

    from test_async import LONG, poll, running

    app = make_app(MAX_QUEUE="4")
    client = app.test_client()
    first = post(client, "busy-key", **LONG)
    poll(client, first.json["task_id"], running)
    with ThreadPoolExecutor(12) as pool:
        replays = [pool.submit(lambda: post(app.test_client(), "busy-key", prefer_async=False, **LONG))
                   for _ in range(12)]
        deadline = time.monotonic() + 20  # the 8 beyond MAX_QUEUE are answered while the task still runs
        while sum(f.done() for f in replays) < 12 - 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(f"/status/{first.json['task_id']}").json["status"] == "started"
        client.delete(f"/tasks/{first.json['task_id']}")
        answers = [f.result(timeout=30) for f in replays]
    refused = [a for a in answers if a.status_code == 503]
    assert len(refused) >= 12 - 4 and all(a.json["error"]["code"] == "queue_full" for a in refused)
    assert all(a.status_code in (503, 409) for a in answers)  # the rest waited, and saw the cancel


def test_the_janitor_deletes_keys_past_result_ttl(make_app, tmp_path, monkeypatch):
    """Before: key files stayed for as long as the service ran (9,823 keys, 40 MB, after RESULT_TTL)."""
    from video_diffusion.backends import embedded

    monkeypatch.setattr(embedded, "KEY_SWEEP_SECONDS", 0.3)
    client = make_app(RESULT_TTL="1").test_client()
    assert post(client, "short-lived", prefer_async=False, **SMALL).status_code == 200
    keys = tmp_path / "videos" / ".idempotency"
    assert len(list(keys.glob("*.json"))) == 1
    deadline = time.monotonic() + 10
    while list(keys.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(keys.glob("*.json"))
