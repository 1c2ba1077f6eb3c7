"""Faults are inputs too (embedded mode): a disk that fills, a folder deleted underneath, unreadable records,
a second instance on the same folder, a task runner that dies. Each ends one task at most, never the service,
and /health never answers "ok" for a service that cannot work."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
import time

import pytest
import requests

from video_diffusion.lifecycle import record as tasks
from conftest import in_lane, GUNICORN, ROOT, SMALL, Gunicorn, image_bytes, settings_for, upload
from server import create_app
from video_diffusion.backends.disk_store import FolderInUse
from video_diffusion.lifecycle.record import TaskStatus
from video_diffusion import errors
from test_async import LONG, ended, poll, running, submit


def _backend(app):
    return app.extensions["video_diffusion"].backend


def _wait_for(predicate, timeout=15.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _queue_behind_a_running_task(client) -> tuple[str, str]:
    """A long task running and a short one waiting behind it: (holder, queued)."""
    holder = submit(client, **LONG).json["task_id"]
    poll(client, holder, running)
    return holder, submit(client, **SMALL).json["task_id"]


def test_disk_full_when_a_record_is_saved_fails_that_task_and_the_next_one_runs(make_app, monkeypatch):
    app = make_app()
    client, backend = app.test_client(), _backend(app)
    holder, doomed = _queue_behind_a_running_task(client)
    real_save, full = backend.store.save, {doomed}

    def save(task):
        if task.task_id in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(task)

    monkeypatch.setattr(backend.store, "save", save)
    after = submit(client, **SMALL).json["task_id"]
    client.delete(f"/tasks/{holder}")
    final = poll(client, doomed, ended)
    assert final["status"] == "failed" and final["error"]["code"] == "storage_error", final
    assert poll(client, after, ended)["status"] == "finished"
    health = client.get("/health")
    assert health.status_code == 200 and health.json["components"]["runner"] == "running"
    # Space comes back: the janitor writes down the end it kept in memory.
    full.clear()
    record = backend.store.root / doomed / "task.json"
    assert _wait_for(lambda: json.loads(record.read_text())["status"] == "failed", timeout=15)


def test_a_queued_tasks_folder_deleted_underneath_fails_that_task_only(client, tmp_path):
    holder, lost = _queue_behind_a_running_task(client)
    shutil.rmtree(tmp_path / "videos" / lost)
    after = submit(client, **SMALL).json["task_id"]
    client.delete(f"/tasks/{holder}")
    final = poll(client, lost, ended)
    assert final["status"] == "failed" and final["error"]["code"] == "storage_error"
    assert poll(client, after, ended)["status"] == "finished"
    assert client.get("/health").status_code == 200
    assert json.loads((tmp_path / "videos" / lost / "task.json").read_text())["status"] == "failed"


def test_unreadable_records_are_quarantined_and_the_rest_start(make_app, tmp_path):
    app = make_app()
    client = app.test_client()
    good = submit(client, prefer="wait", **SMALL).headers["X-Task-Id"]
    newer = submit(client, prefer="wait", **SMALL).headers["X-Task-Id"]
    _backend(app).stop()
    folder = tmp_path / "videos"
    record = json.loads((folder / newer / "task.json").read_text())
    (folder / newer / "task.json").write_text(json.dumps({**record, "from_a_newer_version": {"x": 1}}))
    bad = {"a" * 32: "", "b" * 32: '{"task_id": "bbbb', "c" * 32: "not json at all", "d" * 32: "[1, 2]"}
    for task_id, text in bad.items():
        (folder / task_id).mkdir()
        (folder / task_id / "task.json").write_text(text)

    client = make_app(VIDEO_OUTPUT_PATH=str(folder)).test_client()
    assert client.get("/health").status_code == 200
    for task_id in (good, newer):
        assert client.get(f"/results/{task_id}").status_code == 200
    for task_id in bad:
        assert client.get(f"/status/{task_id}").status_code == 404
    assert len(list((folder / ".quarantine").iterdir())) == len(bad)


# Valid JSON, wrong types, in a record someone edited: (field, value, what the task answers after a restart)
EDITS = [
    ("created_at", None, "repaired"), ("created_at", "yesterday", "repaired"), ("timings", [1, 2], "repaired"),
    ("error", "boom", "repaired"), ("step", -3, "repaired"), ("webhook", "http://x", "repaired"),
    ("finished_at", None, "repaired"), ("params", {"num_frames": 14}, "quarantined"),
    ("result", None, "quarantined"), ("result", {"format": "avi"}, "quarantined"), ("status", "done", "quarantined"),
]


def test_records_with_wrong_types_are_repaired_or_quarantined_and_the_service_starts(make_app, tmp_path, caplog):
    """Before: created_at null stopped the worker at boot (the sort in all_tasks()); the rest answered 500."""
    app = make_app()
    client = app.test_client()
    ids = [submit(client, prefer="wait", **SMALL).headers["X-Task-Id"] for _ in EDITS]
    _backend(app).stop()
    folder = tmp_path / "videos"
    for task_id, (name, value, _) in zip(ids, EDITS):
        path = folder / task_id / "task.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), name: value}))

    app = make_app(VIDEO_OUTPUT_PATH=str(folder))
    client = app.test_client()
    assert client.get("/health").status_code == 200
    for task_id, (name, value, outcome) in zip(ids, EDITS):
        answers = [client.get(f"/status/{task_id}"), client.get(f"/results/{task_id}"),
                   client.get(f"/status/{task_id}/events")]
        for answer in answers:
            answer.get_data()  # the event stream ends at the task's end
            answer.close()
        assert all(a.status_code < 500 for a in answers), (name, value, [a.status_code for a in answers])
        if outcome == "repaired":
            assert answers[0].status_code == 200 and answers[0].json["status"] == "finished", (name, value)
            assert answers[1].status_code == 200, (name, value)
        else:
            assert [a.status_code for a in answers] == [404, 404, 404], (name, value)
    quarantined = sum(outcome == "quarantined" for *_, outcome in EDITS)
    assert len(list((folder / ".quarantine").iterdir())) == quarantined
    assert "repaired to the default" in caplog.text
    assert submit(client, prefer="wait", **SMALL).status_code == 200  # and the service works on


def test_a_record_corrupted_while_running_is_404_and_the_janitor_lives(make_app, tmp_path):
    app = make_app(RESULT_TTL="1")
    client = app.test_client()
    task_id = submit(client, prefer="wait", **SMALL).headers["X-Task-Id"]
    assert _wait_for(lambda: task_id not in _backend(app)._live)  # its end is on disk
    (tmp_path / "videos" / task_id / "task.json").write_bytes(b"")  # a power cut before fsync
    assert client.get(f"/status/{task_id}").status_code == 404
    other = submit(client, prefer="wait", **SMALL).headers["X-Task-Id"]
    time.sleep(1.5)  # the janitor's round over both: it must survive the unreadable one
    assert client.get(f"/results/{other}").status_code == 410
    health = client.get("/health")
    assert health.status_code == 200 and health.json["components"]["janitor"] == "running"


def test_records_go_a_grace_period_after_results_and_ended_inputs_at_once(make_app, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "TOMBSTONE_SECONDS", 1)
    client = make_app(RESULT_TTL="1").test_client()
    holder, canceled = _queue_behind_a_running_task(client)
    client.delete(f"/tasks/{canceled}")
    assert not (tmp_path / "videos" / canceled / "input.png").exists()
    client.delete(f"/tasks/{holder}")
    poll(client, holder, ended)
    assert _wait_for(lambda: not (tmp_path / "videos" / holder / "input.png").exists())  # as its end is saved
    done = submit(client, prefer="wait", **SMALL).headers["X-Task-Id"]
    assert _wait_for(lambda: client.get(f"/status/{done}").status_code == 404, timeout=10)
    assert not (tmp_path / "videos" / done).exists() and not (tmp_path / "videos" / canceled).exists()


def test_one_owner_per_data_folder(make_app, tmp_path, generator):
    make_app()
    with pytest.raises(FolderInUse, match="VIDEO_OUTPUT_PATH=.*in use by another running instance"):
        create_app(settings_for(tmp_path), load=lambda _settings: generator)


@pytest.mark.slow
@in_lane
def test_a_second_service_on_the_same_folder_exits_at_once_naming_it(tmp_path, tiny_model_dir):
    first = Gunicorn(tmp_path / "first", {"SVD_MODEL": str(tiny_model_dir)})
    try:
        first.wait_ready()
        second = Gunicorn(tmp_path / "second", {"SVD_MODEL": str(tiny_model_dir),
                                                "VIDEO_OUTPUT_PATH": str(first.output)})
        assert second.process.wait(30) != 0
        second.stop()
        lines = [line for line in second.logs().splitlines() if line.strip()]
        assert len(lines) == 1 and "VIDEO_OUTPUT_PATH" in lines[0] and "REDIS_URL" in lines[0], lines
        assert requests.get(first.url + "/health", timeout=5).status_code == 200
    finally:
        first.stop()


def test_a_bad_setting_stops_gunicorn_with_one_line(tmp_path):
    result = subprocess.run(GUNICORN, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "MAX_QUEUE": "0", "VIDEO_OUTPUT_PATH": str(tmp_path),
                                 "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "video-diffusion: MAX_QUEUE='0': must be between 1 and 100000"]


def test_a_port_in_use_stops_gunicorn_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(GUNICORN, cwd=tmp_path,
                                env={"PATH": "/usr/bin:/bin", "HOST": "127.0.0.1", "PORT": str(port),
                                     "VIDEO_OUTPUT_PATH": str(tmp_path), "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"PORT={port}: address already in use" in lines[0], result.stderr


def test_a_runner_that_dies_once_is_restarted_and_its_task_fails(make_app, monkeypatch):
    app = make_app()
    client, backend = app.test_client(), _backend(app)
    real = backend._run_one
    calls = []

    def dies_once(task):
        calls.append(task.task_id)
        if len(calls) == 1:
            raise RuntimeError("injected: the runner loop itself fails")
        real(task)

    monkeypatch.setattr(backend, "_run_one", dies_once)
    first = submit(client, **SMALL).json["task_id"]
    final = poll(client, first, ended)
    assert final["status"] == "failed" and final["error"]["code"] == "internal_error"
    assert "injected" not in json.dumps(final)
    second = submit(client, **SMALL).json["task_id"]
    assert poll(client, second, ended)["status"] == "finished"
    assert client.get("/health").json["components"]["runner"] == "running"


def test_a_runner_that_keeps_dying_turns_health_503_and_drain_does_not_wait_for_it(make_app, monkeypatch):
    app = make_app()
    client, backend = app.test_client(), _backend(app)
    backend.supervisor.max_restarts = 1

    def always_fails():
        raise RuntimeError("injected: the runner's own bookkeeping fails")

    monkeypatch.setattr(backend, "_fail_timed_out", always_fails)  # called on every turn of the runner's loop
    assert _wait_for(lambda: client.get("/health").status_code == 503, timeout=10)
    health = client.get("/health").json
    assert health["status"] == "unhealthy" and health["components"]["runner"] == "failed"
    started = time.monotonic()
    backend.drain(timeout=30)
    assert time.monotonic() - started < 2


def test_a_terminal_task_never_changes_again():
    task = tasks.Task(task_id="e" * 32, mode="async", params={"seed": 1})
    task.start(now=time.time())
    task.finish(TaskStatus.FAILED, tasks.failure(errors.WorkerLost), now=time.time())
    for status in TaskStatus:
        with pytest.raises(tasks.IllegalTransition):
            task.move(status)
    assert task.status is TaskStatus.FAILED


def test_no_public_body_says_where(tmp_path, make_app):
    from pipeline import load_generator

    secret_folder = tmp_path / "operators-secret-models" / "svd"
    broken = make_app(load=load_generator, SVD_MODEL=str(secret_folder)).test_client()
    working = make_app().test_client()
    truncated_png = image_bytes(size=(64, 64))[:60]
    responses = [broken.get("/health"), broken.post("/generate", data=upload(image_bytes())),
                 working.post("/generate", data=upload(truncated_png)),
                 working.post("/generate", data=upload(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)),
                 working.get("/status/" + "f" * 32)]
    for response in responses:
        text = response.get_data(as_text=True)
        assert 400 <= response.status_code < 500 or response.status_code == 503, text
        for leak in (str(secret_folder), "operators-secret", str(tmp_path), " object at 0x", "Traceback",
                     "Error:", "Errno", "BytesIO"):
            assert leak not in text, (leak, text)
