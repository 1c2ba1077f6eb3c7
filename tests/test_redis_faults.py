"""Faults in Redis mode: Redis restarted with its data mid-task, a worker restarted under the same name, a job
popped and never claimed, a slow worker whose task was reaped. Every accepted task ends, and a task that
ended never changes again."""

from __future__ import annotations

import json
import time

import pytest

from video_diffusion.backends import redis_store as redis_backend
from conftest import in_lane, SMALL, RedisServer, image_bytes, start_worker_processes, upload
from video_diffusion.backends.redis_store import RedisStore
from video_diffusion.lifecycle.record import Task, TaskStatus, new_task_id
from test_async import ended, poll, running, submit
from test_redis import make_api

pytestmark = pytest.mark.slow


@pytest.fixture
def api(tmp_path, redis_server):
    """The API on this test's own Redis, with no worker: tests play the worker's part by hand."""
    app, client = make_api(tmp_path, redis_server.url)
    yield app.extensions["video_diffusion"].backend, client
    app.extensions["video_diffusion"].backend.stop()


def _queued_task(backend) -> Task:
    from PIL import Image

    task = Task(task_id=new_task_id(), mode="async", params={"seed": 1, "format": "mp4"})
    with backend.admission(task.mode):
        return backend.submit(task, Image.new("RGB", (64, 64)))


def _claim(store: RedisStore, task_id: str, worker: str) -> Task:
    """What a worker does when RQ hands it the job: take it off the queue and claim it."""
    store.queue.remove(task_id)
    task = store.load(task_id)
    task.start(store.clock.now(), worker=worker)
    assert store.compare_and_set(task, expected=[TaskStatus.QUEUED])
    return task


def _beat(store: RedisStore, worker: str, task_id: str | None, rq_worker: str | None = None) -> None:
    store.redis.set(f"vd:worker:{worker}", json.dumps({"name": worker, "state": "ready", "task": task_id,
                                                       "rq_worker": rq_worker}), ex=30)


def _a_running_task_outlives(tmp_path, tiny_model_dir, server: RedisServer, fault, steps: int,
                             timeout: float) -> None:
    """A worker and the API on `server`; `fault(server)` while a task of `steps` steps runs; the task must still
    finish and its video be served."""
    server.start()
    (worker,) = start_worker_processes(tmp_path, tiny_model_dir, server.url, WORKER_TTL="3")
    app, client = make_api(tmp_path, server.url)  # WORKER_TTL=3 too
    try:
        task_id = submit(client, **dict(SMALL, num_inference_steps=steps)).json["task_id"]
        poll(client, task_id, lambda body: running(body) and body["progress"]["step"] >= 2, timeout=60)
        fault(server)
        final = poll(client, task_id, ended, timeout=timeout)
        assert final["status"] == "finished", final
        assert client.get(f"/results/{task_id}").status_code == 200
    finally:
        app.extensions["video_diffusion"].backend.stop()
        worker.stop()
        server.stop()


@in_lane
def test_redis_restarted_with_its_data_mid_task_the_task_still_ends(tmp_path, tiny_model_dir):
    def restart(server):
        server.stop()  # its data is on disk (appendfsync always)
        time.sleep(1.5)
        server.start()

    _a_running_task_outlives(tmp_path, tiny_model_dir, RedisServer(tmp_path, persist=True), restart, steps=40,
                             timeout=90)


@in_lane
def test_redis_paused_longer_than_worker_ttl_fails_no_live_workers_task(tmp_path, tiny_model_dir):
    """Before: Redis SIGSTOPed 20 s with WORKER_TTL=10; the API's reaper failed the task `abandoned` 0.6 s after
    Redis came back, and the worker, alive all along, finished the video and threw it away."""
    import signal

    def pause(server):
        server.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(6.5)  # over twice WORKER_TTL: every heartbeat key is past its expiry when Redis wakes
        finally:
            server.process.send_signal(signal.SIGCONT)

    _a_running_task_outlives(tmp_path, tiny_model_dir, RedisServer(tmp_path), pause, steps=60, timeout=120)


def test_a_worker_restarted_under_the_same_name_fails_its_old_task(api):
    backend, client = api
    store = backend.store
    worker = "box:1:0a0b0c"  # PID 1 in a container, before names carried a random part
    kept = _claim(store, _queued_task(backend).task_id, worker)
    _beat(store, worker, kept.task_id)
    store.reap()
    assert store.load(kept.task_id).status is TaskStatus.STARTED  # its worker is alive and on it

    _beat(store, worker, None)  # the same name, beating again, but running nothing
    store.reap()
    record = client.get(f"/status/{kept.task_id}").json
    assert record["status"] == "failed" and record["error"]["code"] == "abandoned"


def test_a_failed_task_never_becomes_finished(api):
    backend, client = api
    store = backend.store
    slow = "slow:7:abcdef"
    task = _claim(store, _queued_task(backend).task_id, slow)
    store.reap()  # no heartbeat at all: failed as abandoned
    assert store.load(task.task_id).status is TaskStatus.FAILED
    # The slow worker goes on: its progress and its end are refused, its video never stored.
    task.step = 5
    assert store.compare_and_set(task, worker=slow) is False
    assert store.end(task, TaskStatus.FINISHED, None, worker=slow, result=b"a video") is False
    assert store.load(task.task_id).status is TaskStatus.FAILED
    assert store.redis.get(f"vd:result:{task.task_id}") is None
    assert client.get(f"/results/{task.task_id}").json["error"]["code"] == "abandoned"


def test_a_job_popped_but_never_claimed_does_not_stay_queued(api, monkeypatch):
    """RQ's own moves, through its public API: a job popped into the intermediate list, then named to a worker
    and taken off it (RQ's prepare step). Only the one named to a worker with no heartbeat is lost."""
    from rq import Queue

    backend, client = api
    store = backend.store
    monkeypatch.setattr(redis_backend, "LOST_JOB_GRACE", 0)
    in_flight, held, lost, in_queue = (_queued_task(backend).task_id for _ in range(4))
    popped = [Queue.dequeue_any([store.queue], None, connection=store.redis)[0] for _ in range(3)]
    assert [job.id for job in popped] == [in_flight, held, lost]  # first in, first out: the last stays queued
    for job, rq_worker in ((popped[1], "rq-alive"), (popped[2], "rq-dead")):
        with store.redis.pipeline() as pipe:
            job.prepare_for_execution(rq_worker, pipeline=pipe)
            pipe.lrem(store.queue.intermediate_queue_key, 1, job.id)
            pipe.execute()
    _beat(store, "alive:2:aaaaaa", None, rq_worker="rq-alive")
    store.reap()
    statuses = {task_id: client.get(f"/status/{task_id}").json for task_id in (in_queue, in_flight, held, lost)}
    assert [statuses[t]["status"] for t in (in_queue, in_flight, held)] == ["queued"] * 3
    assert statuses[lost]["status"] == "failed" and statuses[lost]["error"]["code"] == "abandoned"


def test_no_public_body_names_the_redis_host(tmp_path):
    port = RedisServer(tmp_path).port  # a free port nothing listens on
    app, client = make_api(tmp_path, f"redis://127.0.0.1:{port}/0")
    try:
        responses = [client.get("/health"), client.post("/generate", data=upload(image_bytes(), **SMALL)),
                     client.get(f"/status/{'a' * 32}"), client.delete(f"/tasks/{'a' * 32}")]
        for response in responses:
            assert response.status_code == 503
            text = response.get_data(as_text=True)
            assert "127.0.0.1" not in text and str(port) not in text and "Error" not in text, text
    finally:
        app.extensions["video_diffusion"].backend.stop()


@in_lane
def test_a_worker_that_cannot_load_says_what_not_where(tmp_path, tiny_model_dir):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    secret = tmp_path / "secret-model-store" / "svd"
    (worker,) = start_worker_processes(tmp_path, secret, redis_server.url, wait_for="failed")
    app, client = make_api(tmp_path, redis_server.url)
    try:
        health = client.get("/health")
        assert health.status_code == 503 and health.json["error"]["code"] == "model_load_failed"
        assert "SVD_MODEL names neither" in health.json["error"]["message"]
        assert "secret-model-store" not in health.get_data(as_text=True)
        refused = client.post("/generate", data=upload(image_bytes(), **SMALL))
        assert refused.status_code == 503 and "secret-model-store" not in refused.get_data(as_text=True)
    finally:
        app.extensions["video_diffusion"].backend.stop()
        worker.stop()
        redis_server.stop()


def test_an_edited_redis_record_is_repaired_or_quarantined_never_a_500(api):
    backend, client = api
    store = backend.store
    repaired, broken = _queued_task(backend), _queued_task(backend)
    for task, edit in ((repaired, {"created_at": None, "timings": "x", "step": "3"}), (broken, {"params": []})):
        key = f"vd:task:{task.task_id}"
        store.redis.set(key, json.dumps({**json.loads(store.redis.get(key)), **edit}))
    answer = client.get(f"/status/{repaired.task_id}")
    assert answer.status_code == 200 and answer.json["status"] == "queued" and answer.json["progress"]["step"] == 0
    assert client.get(f"/status/{broken.task_id}").status_code == 404
    quarantined = f"vd:quarantine:{broken.task_id}"
    assert store.redis.exists(quarantined) and store.redis.ttl(quarantined) > 0
    assert client.get("/health").status_code in (200, 503)  # no worker here: 503 says so, never a 500
