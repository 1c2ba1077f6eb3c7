"""The data folder as a component with a health (embedded mode): deleted underneath, taken by another instance,
read-only at start, over MAX_STORAGE_MB, a disk below MIN_FREE_DISK_MB (a real tmpfs, filled). Before each fix:
507s behind a 200 `ok`, a second instance writing into the same folder, a traceback at start."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import GUNICORN, ROOT, SMALL, free_port
from test_async import ended, poll, submit
from video_diffusion.backends.disk_store import FolderInUse, lock_folder


def _backend(app):
    return app.extensions["video_diffusion"].backend


def _until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_mb, read_only=False) -> a real tmpfs at a fresh folder, unmounted after the test (root only)."""
    mounted = []

    def mount(size_mb: int, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        options = f"size={size_mb}m" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True, check=False)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here (the tests need root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_data_folder_deleted_underneath_is_made_again_and_locked_again(make_app, tmp_path):
    app = make_app()
    client, folder = app.test_client(), tmp_path / "videos"
    shutil.rmtree(folder)
    assert _until(lambda: _backend(app).store.owns_folder())  # re-created, the lock on the new inode
    answer = submit(client, prefer="wait", **SMALL)
    assert answer.status_code == 200, answer.json
    assert client.get("/health").status_code == 200
    with pytest.raises(FolderInUse):  # a second instance on the path: refused, as on a folder never removed
        lock_folder(folder)


def test_a_folder_taken_by_another_instance_after_removal_makes_health_say_so(make_app, tmp_path):
    app = make_app()
    client, folder = app.test_client(), tmp_path / "videos"
    shutil.rmtree(folder)
    other = lock_folder(folder)  # the other instance was quicker
    try:
        assert _until(lambda: client.get("/health").status_code == 503)
        health = client.get("/health").json
        assert health["status"] == "storage_unavailable" and health["storage"]["state"] == "storage_unavailable"
        answer = submit(client, **SMALL)
        assert answer.status_code == 503 and answer.json["error"]["code"] == "storage_unavailable"
        assert "another instance" in answer.json["error"]["message"] and str(tmp_path) not in answer.text
    finally:
        os.close(other)


def test_a_read_only_data_folder_is_a_one_line_error_at_start(tmp_path, tmpfs):
    folder = tmpfs(1, read_only=True)
    env = {**os.environ, "VIDEO_OUTPUT_PATH": str(folder / "data"), "PORT": str(free_port()), "SVD_MODEL": "tiny"}
    result = subprocess.run(GUNICORN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot write there" in lines[0] and "Traceback" not in result.stderr, lines


def test_max_storage_mb_refuses_before_any_work_and_nothing_is_stored_past_it(make_app, tmp_path):
    client = make_app(MAX_STORAGE_MB="1").test_client()
    codes = []
    for _ in range(12):  # frame ZIPs of 14 64x64 frames: about 170 KB each, so 1 MiB holds a handful
        answer = submit(client, prefer="wait", format="frames", **SMALL)
        codes.append(answer.status_code)
        if answer.status_code != 200:
            break
    assert codes[-1] == 507 and 3 <= codes.count(200) <= 7, codes
    assert answer.json["error"]["code"] == "storage_full" and "MAX_STORAGE_MB=1" in answer.json["error"]["message"]
    assert int(answer.headers["Retry-After"]) > 0
    stored = 0
    for path in (tmp_path / "videos").glob("*/*"):
        if path.name == "task.json" or path.name.startswith(".tmp-"):
            continue  # records, and a record being written this moment (renamed into task.json next)
        try:
            stored += path.stat().st_size
        except FileNotFoundError:
            pass
    assert stored <= 2**20


def test_a_disk_below_the_free_floor_is_503_in_health_and_507_at_admission(make_app, tmpfs):
    mount = tmpfs(40)
    app = make_app(VIDEO_OUTPUT_PATH=str(mount / "data"), MIN_FREE_DISK_MB="20")
    client = app.test_client()
    assert submit(client, prefer="wait", **SMALL).status_code == 200
    filler = mount / "filler"
    with open(filler, "wb") as out:
        out.write(b"\0" * 25 * 2**20)  # 15 MB left: below the 20 MB floor
    assert _until(lambda: client.get("/health").status_code == 503)
    assert client.get("/health").json["status"] == "storage_full"
    refused = submit(client, **SMALL)
    assert refused.status_code == 507 and refused.json["error"]["code"] == "storage_full"
    assert "MIN_FREE_DISK_MB=20" in refused.json["error"]["message"] and int(refused.headers["Retry-After"]) > 0
    filler.unlink()  # space comes back: so does the service
    assert _until(lambda: client.get("/health").status_code == 200)
    task_id = submit(client, **SMALL).json["task_id"]
    assert poll(client, task_id, ended)["status"] == "finished"


def test_a_full_disk_fails_or_refuses_the_task_and_health_says_full(make_app, tmpfs):
    """The tmpfs full to the last block: the request is refused (or its task ends storage_error), and /health says
    storage_full rather than ok."""
    mount = tmpfs(8)
    app = make_app(VIDEO_OUTPUT_PATH=str(mount / "data"), MIN_FREE_DISK_MB="0")
    client = app.test_client()
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(1000):  # 64 KB at a time up to ENOSPC: full to the last block (bounded: 64 MB at most)
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    answer = submit(client, format="frames", **SMALL)
    if answer.status_code == 202:
        assert poll(client, answer.json["task_id"], ended)["error"]["code"] == "storage_error"
    else:
        assert answer.status_code in (507, 503), answer.json
    assert _until(lambda: client.get("/health").json["status"] == "storage_full")


def test_health_reports_stored_bytes_and_the_budget(make_app):
    client = make_app(MAX_STORAGE_MB="64").test_client()
    assert submit(client, prefer="wait", **SMALL).status_code == 200
    assert _until(lambda: client.get("/health").json["storage"]["stored_bytes"] > 0)
    storage = client.get("/health").json["storage"]
    assert storage["max_bytes"] == 64 * 2**20 and storage["state"] == "ok" and storage["free_bytes"] > 0
    metrics = client.get("/metrics").text
    stored = next(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("video_diffusion_storage_stored_bytes "))
    assert stored > 0 and "video_diffusion_storage_free_bytes " in metrics
