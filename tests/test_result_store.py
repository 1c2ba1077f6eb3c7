"""RESULT_STORE: videos and inputs outside Redis, in a shared folder or an S3 store (moto's server on loopback),
with real `python worker.py` processes and API replicas that share nothing but Redis and the store."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests

from conftest import (ROOT, SMALL, RedisServer, decode_video, free_port, image_bytes, process_env, settings_for,
                      start_worker_processes, upload)
from server import create_app
from test_async import LONG, ended, poll, running, submit

pytestmark = pytest.mark.slow
AWS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    """moto's S3 server (`moto_server`, a pinned test dependency) on a free loopback port."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, bucket: str = "videos") -> None:
        executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(self.url, timeout=1)
                break
            except requests.ConnectionError:
                assert self.process.poll() is None, "moto_server exited"
                time.sleep(0.1)
        self.client().create_bucket(Bucket=bucket)  # moto keeps everything in memory: a new server, a new bucket

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str = "videos") -> list[str]:
        return [item["Key"] for item in self.client().list_objects_v2(Bucket=bucket).get("Contents", [])]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_deployment(tmp_path_factory, tiny_model_dir, moto):
    """Redis, an S3 store and one worker using it: the settings every process of the deployment shares."""
    folder = tmp_path_factory.mktemp("s3-store")
    server = RedisServer(folder)
    server.start()
    env = {"RESULT_STORE": "s3://videos/vd", "S3_ENDPOINT_URL": moto.url, **AWS}
    (worker,) = start_worker_processes(folder, tiny_model_dir, server.url, **env)
    yield server, env, worker
    worker.stop()
    server.stop()


@pytest.fixture(scope="module")
def folder_deployment(tmp_path_factory, tiny_model_dir):
    """Redis, a shared folder store, and two workers: one serving `tiny` (SVD), one `tiny-wan`. The folder tests'
    APIs name `tiny` as their MODEL (requests without `model` go to it); the routing tests' name none."""
    from pipeline import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("folder-store")
    store = folder / "shared"
    store.mkdir()
    wan = folder / "tiny-wan"
    save_tiny_pipeline(wan, family="wan")
    server = RedisServer(folder)
    server.start()
    env = {"RESULT_STORE": str(store)}
    (svd_worker,) = start_worker_processes(folder, tiny_model_dir, server.url, **env)
    (wan_worker,) = start_worker_processes(folder, wan, server.url, **env)
    yield server, {**env, "MODEL": str(tiny_model_dir)}, store, svd_worker, wan_worker
    for worker in (svd_worker, wan_worker):
        worker.stop()
    server.stop()


def api(tmp_path, url: str, monkeypatch=None, **env):
    """An API replica: its own app and backend on the shared Redis and store (boto3 reads AWS_* from the
    environment, as in a container)."""
    if monkeypatch is not None:
        for name, value in env.items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
    settings = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    app = create_app(settings_for(tmp_path, REDIS_URL=url, WORKER_TTL="3", **settings))
    return app, app.test_client()


def redis_bytes_of(connection, task_id: str) -> int:
    """What one task costs Redis: the memory of every key naming it (`MEMORY USAGE`)."""
    return sum(connection.memory_usage(key) or 0 for key in connection.scan_iter(f"*{task_id}*"))


def test_a_folder_store_keeps_redis_to_records_and_any_replica_serves_the_video(tmp_path, folder_deployment):
    server, env, store, _, _ = folder_deployment
    first, first_client = api(tmp_path / "a", server.url, **env)
    second, second_client = api(tmp_path / "b", server.url, **env)
    try:
        task_id = submit(first_client, **SMALL).json["task_id"]
        final = poll(second_client, task_id, ended)  # the other replica follows it
        assert final["status"] == "finished", final
        video = second_client.get(f"/results/{task_id}")
        assert video.status_code == 200 and video.data == (store / "results" / task_id).read_bytes()
        assert video.data == first_client.get(f"/results/{task_id}").data  # the same bytes from either replica
        assert decode_video(video.data, "mp4")[0].shape[0] == int(SMALL["num_frames"])
        part = second_client.get(f"/results/{task_id}", headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.data == video.data[10:100]

        connection = redis.Redis.from_url(server.url)
        assert connection.exists(f"vd:result:{task_id}", f"vd:input:{task_id}") == 0
        assert not (store / "inputs" / f"{task_id}.png").exists()  # deleted when the task ended
        assert redis_bytes_of(connection, task_id) < 4096  # the record only, whatever the video's size
        store_health = first_client.get("/health").json["result_store"]
        assert store_health["kind"] == "folder" and store_health["state"] == "ok" and store_health["max_bytes"] is None
    finally:
        for app in (first, second):
            app.extensions["video_diffusion"].backend.stop()


def test_a_folder_store_that_is_missing_stops_the_api_and_the_worker_with_one_line(tmp_path, folder_deployment):
    server = folder_deployment[0]
    env = process_env(REDIS_URL=server.url, RESULT_STORE=str(tmp_path / "not-mounted"), PORT=str(free_port()),
                      HOST="127.0.0.1", VIDEO_OUTPUT_PATH=str(tmp_path / "videos"))
    for command in ([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py")],
                    [sys.executable, str(ROOT / "worker.py")]):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if "RESULT_STORE" in line]
        assert len(lines) == 1 and "not-mounted" in lines[0] and "does not exist" in lines[0], result.stderr


def test_videos_stored_in_redis_before_the_switch_are_still_served(tmp_path, folder_deployment):
    """A deployment that moves from RESULT_STORE=redis keeps serving the `vd:result` keys it already has."""
    server, env = folder_deployment[:2]
    app, client = api(tmp_path, server.url, **env)
    try:
        task_id = submit(client, **SMALL).json["task_id"]
        assert poll(client, task_id, ended)["status"] == "finished"
        connection = redis.Redis.from_url(server.url)
        stored = client.get(f"/results/{task_id}").data
        # As an older release left it: the video in Redis, none in the store.
        connection.set(f"vd:result:{task_id}", stored)
        (Path(env["RESULT_STORE"]) / "results" / task_id).unlink()
        again = client.get(f"/results/{task_id}")
        assert again.status_code == 200 and again.data == stored
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_an_s3_store_streams_redirects_and_deletes_inputs(tmp_path, s3_deployment, moto, monkeypatch):
    server, env, _ = s3_deployment
    app, client = api(tmp_path, server.url, monkeypatch, **env)
    redirecting, redirect_client = api(tmp_path / "r", server.url, monkeypatch, RESULT_REDIRECT="true", **env)
    try:
        task_id = submit(client, **dict(SMALL, format="webm")).json["task_id"]
        assert poll(client, task_id, ended)["status"] == "finished"
        assert f"vd/results/{task_id}" in moto.keys() and f"vd/inputs/{task_id}.png" not in moto.keys()
        video = client.get(f"/results/{task_id}")
        assert video.status_code == 200 and video.headers["Content-Type"] == "video/webm"
        assert video.data == moto.client().get_object(Bucket="videos", Key=f"vd/results/{task_id}")["Body"].read()
        part = client.get(f"/results/{task_id}", headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.data == video.data[100:]
        assert redis_bytes_of(redis.Redis.from_url(server.url), task_id) < 4096

        moved = redirect_client.get(f"/results/{task_id}")
        assert moved.status_code == 307 and moved.headers["Location"].startswith(moto.url + "/videos/vd/results/")
        assert moved.headers["X-Seed"] and "X-Amz-Signature=" in moved.headers["Location"]
        fetched = requests.get(moved.headers["Location"], timeout=10)  # no credentials: the URL is the key
        assert fetched.status_code == 200 and fetched.content == video.data
        assert fetched.headers["Content-Disposition"] == f"attachment; filename={task_id}.webm"
        assert redirect_client.get(f"/results/{task_id}", headers={"Accept": "application/json"}).status_code == 200
        # A video kept in Redis from before the store moved: served by the API, not redirected to nothing.
        redis.Redis.from_url(server.url).set(f"vd:result:{task_id}", video.data)
        moto.client().delete_object(Bucket="videos", Key=f"vd/results/{task_id}")
        legacy = redirect_client.get(f"/results/{task_id}")
        assert legacy.status_code == 200 and legacy.data == video.data
    finally:
        for one in (app, redirecting):
            one.extensions["video_diffusion"].backend.stop()


def test_an_s3_outage_fails_the_running_task_storage_error_health_says_so_and_it_recovers(
        tmp_path, s3_deployment, moto, monkeypatch):
    server, env, _ = s3_deployment
    monkeypatch.setattr("video_diffusion.backends.blobs.StoreWatch.CHECK_SECONDS", 0.5)
    app, client = api(tmp_path, server.url, monkeypatch, **env)
    try:
        task_id = submit(client, **LONG).json["task_id"]
        poll(client, task_id, running)
        moto.stop()
        final = poll(client, task_id, ended, timeout=60)
        assert final["status"] == "failed" and final["error"]["code"] == "storage_error", final
        assert "result store (s3)" in final["error"]["message"] and "127.0.0.1" not in str(final)
        deadline = time.monotonic() + 15
        while (health := client.get("/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health.status_code == 503 and health.json["status"] == "storage_unavailable"
        assert health.json["result_store"] == {"kind": "s3", "state": "storage_unavailable"}
        refused = client.post("/generate", data=upload(image_bytes(), **SMALL), headers={"Prefer": "respond-async"})
        assert refused.status_code == 503 and refused.json["error"]["code"] == "storage_unavailable"
        assert str(moto.port) not in refused.get_data(as_text=True)

        moto.start()  # back (moto keeps nothing: a new, empty bucket)
        deadline = time.monotonic() + 15
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/health").status_code == 200
        again = submit(client, **SMALL).json["task_id"]
        assert poll(client, again, ended)["status"] == "finished"
        assert client.get(f"/results/{again}").status_code == 200
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_the_sweep_deletes_what_outlived_result_ttl_from_either_store(tmp_path, moto, monkeypatch):
    """The loop every API process runs: objects older than RESULT_TTL go, younger ones stay."""
    import io

    from video_diffusion.backends.blobs import FolderBlobs, S3Blobs

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    stores = [FolderBlobs(tmp_path / "store"), S3Blobs("videos", "sweep", endpoint_url=moto.url)]
    (tmp_path / "store").mkdir()
    for store in stores:
        store.put("results/old", io.BytesIO(b"old video"))
        store.put("inputs/old.png", io.BytesIO(b"old input"))
    cutoff = time.time() + 0.5  # everything written so far is older
    time.sleep(2)  # S3 keeps LastModified to the second
    for store in stores:
        store.put("results/young", io.BytesIO(b"young video"))
        assert store.sweep(cutoff) == 2
        assert store.open("results/old") is None and store.open("inputs/old.png") is None
        with store.open("results/young") as young:
            assert young.read() == b"young video"


# --- one API in front of workers for several models --------------------------------------------------------

def test_one_api_routes_each_request_to_a_worker_of_the_model_it_names(tmp_path, folder_deployment):
    server, env, _, svd_worker, wan_worker = folder_deployment
    app, client = api(tmp_path, server.url, RESULT_STORE=env["RESULT_STORE"])  # no MODEL: no default
    try:
        health = client.get("/health").json
        assert health["workers"] == 2 and health["models"] == {"tiny": 1, "tiny-wan": 1}, health

        unnamed = client.post("/generate", data=upload(image_bytes(), **SMALL))
        assert unnamed.status_code == 422 and unnamed.json["error"]["field"] == "model"
        assert "tiny, tiny-wan" in unnamed.json["error"]["message"]
        unknown = client.post("/generate", data=upload(image_bytes(), model="svd-xt", **SMALL))
        assert unknown.status_code == 422 and "tiny, tiny-wan" in unknown.json["error"]["message"]
        # Each model's own schema: Wan takes a prompt and no motion_bucket_id, and its frames are 4k+1.
        wrong = client.post("/generate", data=upload(image_bytes(), model="tiny-wan", motion_bucket_id="100"))
        assert wrong.status_code == 422 and wrong.json["error"]["field"] == "motion_bucket_id"
        assert client.get("/params?model=tiny-wan").json["family"] == "wan"
        assert client.get("/params?model=tiny").json["family"] == "svd"
        assert sorted(client.get("/params").json["models"]) == ["tiny", "tiny-wan"]

        wan_task = submit(client, model="tiny-wan", prompt="a red square", width="64", height="64",
                          num_frames="9", num_inference_steps="2").json["task_id"]
        svd_task = submit(client, model="tiny", motion_bucket_id="90", **SMALL).json["task_id"]
        for task_id, worker, frames in ((wan_task, wan_worker, 9), (svd_task, svd_worker, 14)):
            final = poll(client, task_id, ended)
            assert final["status"] == "finished", final
            backend = client.application.extensions["video_diffusion"].backend
            assert backend.store.load(task_id).worker == worker.name  # run by that model's worker
            video = client.get(f"/results/{task_id}")
            assert decode_video(video.data, "mp4")[0].shape[0] == frames
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_with_a_default_model_a_request_without_model_goes_to_it(tmp_path, folder_deployment):
    server, env, _, _, wan_worker = folder_deployment
    app, client = api(tmp_path, server.url, **{**env, "MODEL": "tiny-wan"})
    try:
        task_id = submit(client, prompt="a boat", width="64", height="64", num_frames="9",
                         num_inference_steps="2").json["task_id"]
        assert poll(client, task_id, ended)["status"] == "finished"
        assert client.application.extensions["video_diffusion"].backend.store.load(task_id).worker == wan_worker.name
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_a_gunicorn_replica_serves_what_another_accepted(tmp_path, folder_deployment):
    """Two API processes (gunicorn, and one in this process) on one Redis and one store: either serves the task
    the other accepted, byte for byte."""
    from conftest import ready_gunicorn

    server, env = folder_deployment[:2]
    app, client = api(tmp_path / "in-process", server.url, **env)
    try:
        with ready_gunicorn(tmp_path / "gunicorn", {"REDIS_URL": server.url, "WORKER_TTL": "3", **env}) as replica:
            accepted_here = submit(client, **SMALL).json["task_id"]
            accepted_there = requests.post(replica.url + "/generate", files={"image": ("i.png", image_bytes())},
                                           data=SMALL, headers={"Prefer": "respond-async"}, timeout=30).json()["task_id"]
            for task_id in (accepted_here, accepted_there):
                assert poll(client, task_id, ended)["status"] == "finished"
                there = requests.get(f"{replica.url}/results/{task_id}", timeout=30)
                here = client.get(f"/results/{task_id}")
                assert there.status_code == here.status_code == 200 and there.content == here.data
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_a_folder_store_at_max_storage_mb_refuses_new_work(tmp_path, folder_deployment):
    server, env, store = folder_deployment[:3]
    filler = store / "results" / ("f" * 32)
    filler.parent.mkdir(exist_ok=True)
    filler.write_bytes(b"\0" * (2 << 20))  # 2 MiB of old videos against MAX_STORAGE_MB=1
    app, client = api(tmp_path, server.url, MAX_STORAGE_MB="1", **env)
    try:
        health = client.get("/health")
        assert health.status_code == 503 and health.json["status"] == "storage_full"
        assert health.json["result_store"]["stored_bytes"] >= 2 << 20 and health.json["result_store"]["max_bytes"] == 1 << 20
        refused = client.post("/generate", data=upload(image_bytes(), **SMALL), headers={"Prefer": "respond-async"})
        assert refused.status_code == 507 and refused.json["error"]["code"] == "storage_full"
        assert "MAX_STORAGE_MB=1" in refused.json["error"]["message"] and refused.headers["Retry-After"]
    finally:
        filler.unlink()
        app.extensions["video_diffusion"].backend.stop()


def test_a_write_that_fails_midway_leaves_nothing_under_the_name(tmp_path, moto, monkeypatch):
    """Atomic writes, on the real folder and the real S3 server: a reader that breaks mid-upload leaves no
    object (and no partial file) for a reader to find."""
    import io

    from video_diffusion.backends.blobs import BlobStoreError, FolderBlobs, S3Blobs

    class Breaks(io.RawIOBase):
        def __init__(self):
            self.sent = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            if self.sent > 20 << 20:
                raise OSError("the disk under the encoder went away")
            buffer[:len(buffer)] = b"\1" * len(buffer)
            self.sent += len(buffer)
            return len(buffer)

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "store").mkdir()
    for store in (FolderBlobs(tmp_path / "store"), S3Blobs("videos", "atomic", endpoint_url=moto.url)):
        with pytest.raises((BlobStoreError, OSError)):
            store.put("results/broken", io.BufferedReader(Breaks(), 1 << 20))
        assert store.open("results/broken") is None
    assert list((tmp_path / "store").rglob("*partial*")) == []
    assert not [k for k in moto.keys() if k.startswith("atomic/")]


def test_the_page_offers_the_models_and_shows_each_ones_controls(tmp_path, folder_deployment):
    from playwright.sync_api import expect, sync_playwright

    from conftest import ready_gunicorn
    from test_page import CHROMIUM_ARGS

    server, env = folder_deployment[:2]
    with ready_gunicorn(tmp_path, {"REDIS_URL": server.url, "RESULT_STORE": env["RESULT_STORE"]}) as api_server, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(api_server.url + "/")
            picker = page.get_by_label("Model", exact=True)
            expect(picker).to_be_visible()
            assert sorted(picker.locator("option").all_inner_texts()) == ["tiny", "tiny-wan"]
            picker.select_option("tiny-wan")
            expect(page.get_by_label("Prompt", exact=True)).to_be_visible()  # Wan's own controls
            expect(page.get_by_label("Motion amount", exact=True)).to_have_count(0)
            picker.select_option("tiny")
            expect(page.get_by_label("Motion amount", exact=True)).to_be_visible()
        finally:
            browser.close()
