"""RESULT_STORE: what a finished task costs Redis with each store, and how fast a big video comes back through each.

    python bench/result_store.py [--smoke]

Real parts on loopback: Debian's redis-server, moto's S3 server (`moto_server`), `python worker.py` on the tiny
model and the API under gunicorn, as `make run` starts it.

1. Redis bytes per finished task: N tasks making frame ZIPs (256x144, 14 lossless PNGs: about 1.2 MB each) through
   a worker, then Redis's `MEMORY USAGE` of every key naming each task, and `used_memory` before against after.
2. Time to first byte and to the last of a 100 MB video (`GET /results/{id}` through the API, streamed) against
   reading the same bytes from a local file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import ROOT, Service, free_port, table, tiny_model

AWS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    wait_port(port)
    return process, f"redis://127.0.0.1:{port}/0"


def start_moto() -> tuple[subprocess.Popen, str]:
    import boto3

    port = free_port()
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_port(port)
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="bench")
    return process, url


def start_worker(folder: Path, redis_url: str, model: Path, env: dict[str, str]) -> subprocess.Popen:
    import redis

    log = open(folder / f"worker-{time.monotonic_ns()}.log", "wb")
    process = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "MODEL": str(model),
                                    "WORKER_METRICS_PORT": "0", "HOST": "127.0.0.1", **env})
    connection = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        beats = [json.loads(v) for v in connection.mget(list(connection.scan_iter("vd:worker:*"))) if v] \
            if list(connection.scan_iter("vd:worker:*")) else []
        if any(b["state"] == "ready" for b in beats):
            return process
        if process.poll() is not None:
            raise RuntimeError("the worker exited: " + Path(log.name).read_text())
        time.sleep(0.2)
    raise RuntimeError("the worker did not become ready")


def finished_tasks(url: str, count: int, size: tuple[int, int]) -> list[str]:
    from PIL import Image

    picture = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize(size).save(picture, format="PNG")
    ids = []
    for i in range(count):
        response = requests.post(url + "/generate", headers={"Prefer": "respond-async"}, timeout=60,
                                 files={"image": ("in.png", picture.getvalue(), "image/png")},
                                 data={"format": "frames", "num_inference_steps": "2", "seed": str(100 + i),
                                       "width": str(size[0]), "height": str(size[1])})
        response.raise_for_status()
        ids.append(response.json()["task_id"])
    for task_id in ids:
        deadline = time.monotonic() + 300
        while (status := requests.get(f"{url}/status/{task_id}", timeout=10).json()["status"]) not in (
                "finished", "failed", "canceled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {task_id} did not end")
            time.sleep(0.1)
        if status != "finished":
            raise RuntimeError(f"task {task_id} {status}")
    return ids


def redis_cost(folder: Path, model: Path, spec: str, extra: dict[str, str], count: int,
               sizes: list[tuple[int, int]]) -> list[list[object]]:
    import redis

    redis_process, redis_url = start_redis(folder)
    worker = None
    service = None
    try:
        env = {"RESULT_STORE": spec, **extra}
        worker = start_worker(folder, redis_url, model, env)
        service = Service(folder / f"api-{time.monotonic_ns()}", {"REDIS_URL": redis_url, **env})
        service.wait_ready()
        connection = redis.Redis.from_url(redis_url)
        finished_tasks(service.url, 1, sizes[0])  # Redis's own first allocations (the stats hash, RQ's sets)
        rows = []
        kind = "s3" if spec.startswith("s3") else ("folder" if spec.startswith("/") else spec)
        for size in sizes:
            before = connection.info("memory")["used_memory"]
            ids = finished_tasks(service.url, count, size)
            after = connection.info("memory")["used_memory"]
            per_task = [sum(connection.memory_usage(k) or 0 for k in connection.scan_iter(f"*{task_id}*"))
                        for task_id in ids]
            video = sum(len(requests.get(f"{service.url}/results/{t}", timeout=60).content) for t in ids) / len(ids)
            rows.append([kind, f"{size[0]}x{size[1]}", f"{video / 1e6:.2f} MB", f"{statistics.median(per_task):,.0f} B",
                         f"{(after - before) / count:,.0f} B", "yes" if max(per_task) < 4096 else "no"])
        return rows
    finally:
        for process in (worker,):
            if process is not None:
                process.terminate()
                process.wait(30)
        if service is not None:
            service.stop()
        redis_process.terminate()
        redis_process.wait(10)


def plant(connection, task_id: str, size: int) -> None:
    """A finished task's record, as a worker leaves it, for a video of `size` bytes."""
    sys.path.insert(0, str(ROOT))
    from video_diffusion.lifecycle.record import Task, TaskStatus

    now = time.time()
    task = Task(task_id=task_id, mode="async", params={"seed": 1, "format": "mp4"}, created_at=now - 2)
    task.status, task.started_at, task.finished_at, task.model = TaskStatus.FINISHED, now - 1, now, "bench"
    task.result = {"format": "mp4", "content_type": "video/mp4", "filename": f"{task_id}.mp4", "bytes": size,
                   "frames": 25}
    connection.set(f"vd:task:{task_id}", task.to_json(), ex=3600)


def first_byte(url: str, repeats: int) -> tuple[float, float]:
    """Median seconds to the first byte and to the last of a streamed GET."""
    firsts, totals = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        with requests.get(url, stream=True, timeout=300) as response:
            response.raise_for_status()
            chunks = response.iter_content(1 << 16)
            next(chunks)
            firsts.append(time.perf_counter() - started)
            for _chunk in chunks:
                pass
        totals.append(time.perf_counter() - started)
    return statistics.median(firsts), statistics.median(totals)


def download_times(folder: Path, size: int, repeats: int, moto_url: str) -> list[list[object]]:
    import redis

    sys.path.insert(0, str(ROOT))
    from video_diffusion.backends.blobs import FolderBlobs, S3Blobs, result_name

    payload = os.urandom(size)
    local = folder / "direct.bin"
    local.write_bytes(payload)
    rows = []
    firsts, totals = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        with open(local, "rb") as handle:
            handle.read(1 << 16)
            firsts.append(time.perf_counter() - started)
            while handle.read(1 << 20):
                pass
        totals.append(time.perf_counter() - started)
    rows.append(["a local file, read directly", f"{statistics.median(firsts) * 1000:.2f} ms",
                 f"{statistics.median(totals):.3f} s", "-"])
    stores = {"redis": "redis", "folder": str(folder / "store"), "s3": "s3://bench/vd"}
    (folder / "store").mkdir()
    for kind, spec in stores.items():
        redis_process, redis_url = start_redis(folder)
        service = None
        try:
            connection = redis.Redis.from_url(redis_url)
            task_id = os.urandom(16).hex()
            plant(connection, task_id, size)
            if kind == "redis":
                connection.set(f"vd:result:{task_id}", payload, ex=3600)
            elif kind == "folder":
                FolderBlobs(Path(spec)).put(result_name(task_id), io.BytesIO(payload))
            else:
                S3Blobs("bench", "vd", endpoint_url=moto_url).put(result_name(task_id), io.BytesIO(payload))
            service = Service(folder / f"api-{kind}", {"REDIS_URL": redis_url, "RESULT_STORE": spec,
                                                       "S3_ENDPOINT_URL": moto_url})
            # No worker: the API answers /results from Redis and the store alone (its /health waits for one).
            wait_port(service.port)
            deadline = time.monotonic() + 60
            while requests.get(f"{service.url}/status/{task_id}", timeout=5).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the API did not answer")
                time.sleep(0.2)
            first, total = first_byte(f"{service.url}/results/{task_id}", repeats)
            rows.append([f"`RESULT_STORE={kind}` through the API", f"{first * 1000:.1f} ms", f"{total:.3f} s",
                         f"{total / statistics.median(totals):.1f}x"])
        finally:
            if service is not None:
                service.stop()
            redis_process.terminate()
            redis_process.wait(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 task per store, a 4 MB video, 1 download")
    args = parser.parse_args()
    os.environ.update(AWS)
    count, size, repeats = (1, 4 << 20, 1) if args.smoke else (3, 100 << 20, 5)
    sizes = [(256, 144)] if args.smoke else [(256, 144), (512, 288)]
    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
    model = tiny_model(folder)
    moto, moto_url = start_moto()
    try:
        (folder / "shared").mkdir()
        stores = [("redis", {}), (str(folder / "shared"), {}), ("s3://bench/vd", {"S3_ENDPOINT_URL": moto_url})]
        rows = [row for spec, extra in stores for row in redis_cost(folder, model, spec, extra, count, sizes)]
        print(f"### Redis bytes per finished task\n\n{count} task(s) per store and size, each a frames ZIP (14 PNGs), "
              "through a real worker, after one task that pays Redis's first allocations; bytes of every Redis key "
              "naming the task (`MEMORY USAGE`), and Redis's `used_memory` growth per task.\n\n"
              + table(["store", "size", "video", "Redis keys per task", "used_memory per task", "< 4 KB"], rows))
        print(f"\n### Time to the first byte of a {size >> 20} MB video\n\n`GET /results/{{id}}` through the API "
              f"(gunicorn, loopback), streamed in 64 KiB chunks; medians of {repeats}. S3 is moto's server on "
              "loopback: a real S3 adds the network.\n\n"
              + table(["read", "first byte", "last byte", "last byte vs direct"],
                      download_times(folder, size, repeats, moto_url)))
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
