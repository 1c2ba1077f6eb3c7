"""The async contract in the embedded (single-process) mode: submit, status, results, cancel, expiry."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import SMALL, SteppedClock, decode_video, image_bytes, upload
from pipeline import VideoGenerator

# Enough steps at a tiny size to hold the runner for a few seconds; canceled before the end.
LONG = dict(SMALL, num_inference_steps=100)


def submit(client, prefer="respond-async", **params):
    return client.post("/generate", data=upload(image_bytes(), **params), headers={"Prefer": prefer} if prefer else {})


def poll(client, task_id, until, timeout=30.0, seen=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/status/{task_id}").json
        if seen is not None:
            seen.append(body)
        if until(body):
            return body
        time.sleep(0.01)
    raise AssertionError(f"task {task_id} never reached the state asked; last: {body}")


def ended(body):
    return body["status"] in ("finished", "failed", "canceled")


def running(body):
    return body["status"] == "started" and body["progress"]["step"] >= 1


def test_submit_watch_progress_and_download(client):
    response = submit(client, **dict(SMALL, num_inference_steps=12, seed=11))
    assert response.status_code == 202
    body = response.json
    task_id = body["task_id"]
    assert len(task_id) == 32 and body["status"] == "queued" and body["seed"] == 11
    assert response.headers["Location"] == f"/status/{task_id}"
    seen = []
    final = poll(client, task_id, ended, seen=seen)
    assert final["status"] == "finished", final
    steps = {(b["progress"]["phase"], b["progress"]["step"]) for b in seen if b["status"] == "started"}
    assert any(phase == "denoising" and 0 < step < 12 for phase, step in steps), steps
    assert final["progress"] == {"phase": "done", "step": 12, "total": 12}
    assert final["params"]["width"] == 64 and final["model"].startswith(str(final["model"]).split(" ")[0])
    assert final["started_at"] <= final["finished_at"] and set(final["timings"]) == {"queue_wait", "generation",
                                                                                     "postprocessing", "encoding"}
    video = client.get(final["result_url"])
    assert video.status_code == 200 and video.headers["X-Seed"] == "11"
    frames, _ = decode_video(video.data, "mp4")
    assert frames.shape == (14, 64, 64, 3)


def test_results_answer_202_with_the_status_until_finished(client):
    task_id = submit(client, **LONG).json["task_id"]
    response = client.get(f"/results/{task_id}")
    assert response.status_code == 202 and response.json["task_id"] == task_id
    assert response.json["status"] in ("queued", "started")
    client.delete(f"/tasks/{task_id}")


def test_generate_mode_async_makes_async_the_default_and_prefer_wait_still_works(make_app):
    client = make_app(GENERATE_MODE="async").test_client()
    response = submit(client, prefer=None, **SMALL)
    assert response.status_code == 202 and response.json["status"] == "queued"
    waited = submit(client, prefer="wait", **SMALL)
    assert waited.status_code == 200 and waited.headers["Content-Type"] == "video/mp4"


def test_cancel_a_queued_task_and_a_running_one(client):
    first = submit(client, **LONG).json["task_id"]
    poll(client, first, running)
    second = submit(client, **SMALL).json["task_id"]
    queued = client.get(f"/status/{second}").json
    assert queued["status"] == "queued" and queued["queue_position"] == 1

    canceled = client.delete(f"/tasks/{second}")
    assert canceled.status_code == 200 and canceled.json["status"] == "canceled"
    stopping = client.delete(f"/tasks/{first}")
    assert stopping.status_code == 202 and stopping.json["status"] == "started"
    final = poll(client, first, ended)
    assert final["status"] == "canceled" and final["error"]["code"] == "canceled"
    assert final["progress"]["step"] < 100

    never_ran = client.get(f"/status/{second}").json
    assert never_ran["status"] == "canceled" and never_ran["started_at"] is None
    again = client.delete(f"/tasks/{first}")
    assert again.status_code == 409 and again.json["error"]["code"] == "already_ended"
    assert client.get(f"/results/{first}").json["error"]["code"] == "canceled"


@pytest.mark.parametrize("task_id", ["0" * 32, "not-an-id", "..%2F..%2Fetc%2Fpasswd", "A" * 32, "0" * 33])
def test_unknown_and_malformed_ids_get_the_same_404(client, task_id):
    for method, path in (("get", "/status/"), ("get", "/results/"), ("delete", "/tasks/")):
        response = getattr(client, method)(path + task_id)
        assert response.status_code == 404
        assert response.json == {"error": {"code": "not_found", "message": "no task with this id"}}


def test_a_result_expires_after_result_ttl(make_app, tmp_path):
    clock = SteppedClock()
    client = make_app(RESULT_TTL="1", clock=clock).test_client()
    response = submit(client, prefer="wait", **SMALL)
    task_id = response.headers["X-Task-Id"]
    assert client.get(f"/results/{task_id}").status_code == 200
    clock.advance(1.1)
    gone = client.get(f"/results/{task_id}")
    assert gone.status_code == 410 and gone.json["error"]["code"] == "expired"
    assert sorted(p.name for p in (tmp_path / "videos" / task_id).iterdir()) == ["task.json"]
    status = client.get(f"/status/{task_id}").json
    assert status["expired"] is True and status["result_url"] is None


def test_sync_and_async_requests_share_one_line_in_arrival_order(client):
    holder = submit(client, **LONG).json["task_id"]
    poll(client, holder, running)
    sync_ids, order = [], []

    def sync_request():
        response = submit(client, prefer="wait", **SMALL)
        assert response.status_code == 200
        sync_ids.append(response.headers["X-Task-Id"])

    def waiting():
        return client.get("/health").json["waiting"]

    threads = []
    for index in range(4):
        if index % 2 == 0:
            threads.append(threading.Thread(target=sync_request))
            threads[-1].start()
            order.append(("sync", len(threads) - 1))
        else:
            order.append(("async", submit(client, **SMALL).json["task_id"]))
        deadline = time.monotonic() + 10
        while waiting() < index + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    client.delete(f"/tasks/{holder}")
    for thread in threads:
        thread.join(30)
    assert len(sync_ids) == 2
    sync_iter = iter(sync_ids)
    ids = [next(sync_iter) if kind == "sync" else value for kind, value in order]
    finals = [poll(client, task_id, ended) for task_id in ids]
    assert [f["status"] for f in finals] == ["finished"] * 4
    started = [f["started_at"] for f in finals]
    assert started == sorted(started)


class RaisesOom:
    scheduler = None  # a pipeline's part that VideoGenerator hands the request's generator to

    def __call__(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_a_failed_task_says_why_in_status_and_results(make_app, generator):
    raises_oom = VideoGenerator(RaisesOom(), generator.model, "cpu", "float32")
    client = make_app(load=lambda _settings: raises_oom).test_client()
    task_id = submit(client, **SMALL).json["task_id"]
    final = poll(client, task_id, ended)
    assert final["status"] == "failed" and final["error"]["code"] == "out_of_memory"
    response = client.get(f"/results/{task_id}")
    assert response.status_code == 409 and response.json["error"]["code"] == "out_of_memory"


def test_a_task_whose_input_is_lost_fails_and_the_runner_carries_on(client, tmp_path):
    holder = submit(client, **LONG).json["task_id"]
    poll(client, holder, running)
    lost = submit(client, **SMALL).json["task_id"]
    (tmp_path / "videos" / lost / "input.png").unlink()
    after = submit(client, **SMALL).json["task_id"]
    client.delete(f"/tasks/{holder}")
    final = poll(client, lost, ended)
    assert final["status"] == "failed" and final["error"]["code"] == "storage_error"
    assert poll(client, after, ended)["status"] == "finished"
