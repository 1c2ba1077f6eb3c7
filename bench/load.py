"""Load: 16 concurrent clients, 4 requests each, half synchronous and half async, tiny pipeline.

Measures errors, whether the service ran tasks first come first served, throughput against the same requests
sent one by one, /health latency during the run, and the worker's resident memory over 200 requests.
Goals: 0 errors, FCFS, throughput >= 0.95x sequential, memory growth < 50 MB.

    python bench/load.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from common import Service, rss_bytes, table, tiny_model

IMAGE = Path(tempfile.mkdtemp(prefix="bench-load-img-")) / "input.png"


def one_sync(url: str, params: dict) -> tuple[bool, str | None]:
    response = requests.post(url + "/generate", data=params, files={"image": IMAGE.read_bytes()}, timeout=600)
    return response.status_code == 200, response.headers.get("X-Task-Id")


POLL_SECONDS = 1.0  # as demo.sh polls; the web page streams events instead


def one_async(url: str, params: dict) -> tuple[bool, str | None]:
    response = requests.post(url + "/generate", data=params, files={"image": IMAGE.read_bytes()},
                             headers={"Prefer": "respond-async"}, timeout=60)
    if response.status_code != 202:
        return False, None
    task_id = response.json()["task_id"]
    while True:
        status = requests.get(f"{url}/status/{task_id}", timeout=30).json()["status"]
        if status in ("finished", "failed", "canceled"):
            break
        time.sleep(POLL_SECONDS)
    video = requests.get(f"{url}/results/{task_id}", timeout=60)
    return status == "finished" and video.status_code == 200, task_id


def client(url: str, params: dict, asynchronous: bool, count: int) -> list[tuple[bool, str | None]]:
    run = one_async if asynchronous else one_sync
    return [run(url, params) for _ in range(count)]


def watch_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        requests.get(url + "/health", timeout=10)
        latencies.append(time.perf_counter() - started)
        stop.wait(0.05)


def fcfs(service: Service, task_ids: list[str]) -> bool:
    records = [json.loads((service.output / t / "task.json").read_text()) for t in task_ids]
    by_arrival = sorted(records, key=lambda r: r["created_at"])
    starts = [r["started_at"] for r in by_arrival]
    return starts == sorted(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 clients, 1 request each, 8 for memory")
    args = parser.parse_args()
    clients, per_client, memory_requests = (4, 1, 8) if args.smoke else (16, 4, 200)
    params = {"width": "128", "height": "128", "num_inference_steps": "4", "seed": "7"}
    folder = Path(tempfile.mkdtemp(prefix="bench-load-"))
    from PIL import Image

    Image.linear_gradient("L").convert("RGB").resize((320, 240)).save(IMAGE)
    service = Service(folder, {"SVD_MODEL": str(tiny_model(folder)), "MAX_QUEUE": str(clients * per_client + 8)})
    try:
        service.wait_ready()
        total = clients * per_client
        client(service.url, params, False, 2)  # warm-up

        started = time.perf_counter()
        sequential = client(service.url, params, False, total)
        sequential_s = time.perf_counter() - started

        latencies: list[float] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch_health, args=(service.url, stop, latencies))
        watcher.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, service.url, params, i % 2 == 1, per_client) for i in range(clients)]
            concurrent = [r for f in futures for r in f.result()]
        concurrent_s = time.perf_counter() - started
        stop.set()
        watcher.join()

        errors = sum(1 for ok, _ in sequential + concurrent if not ok)
        in_order = fcfs(service, [t for ok, t in concurrent if ok])
        pid = service.worker_pid()
        rss_before = rss_bytes(pid)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: one_sync(service.url, params), range(memory_requests)))
        rss_after = rss_bytes(pid)
    finally:
        service.stop()
    ratio = (total / concurrent_s) / (total / sequential_s)
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else latencies[0]
    growth = (rss_after - rss_before) / 2**20
    print(f"{clients} clients x {per_client} requests (half sync, half async), 128x128, 14 frames, 4 steps.\n\n"
          + table(["measure", "value", "goal"], [
              ["errors", errors, "0"],
              ["service order first come, first served", "yes" if in_order else "no", "yes"],
              ["sequential", f"{total} in {sequential_s:.1f} s ({total / sequential_s:.2f}/s)", ""],
              ["concurrent", f"{total} in {concurrent_s:.1f} s ({total / concurrent_s:.2f}/s)", ""],
              ["throughput concurrent / sequential", f"{ratio:.2f}", "≥ 0.95"],
              ["/health latency during the run", f"p50 {1000 * statistics.median(latencies):.1f} ms, "
               f"p99 {1000 * p99:.1f} ms, max {1000 * max(latencies):.1f} ms ({len(latencies)} probes)", ""],
              [f"worker RSS over {memory_requests} more requests",
               f"{rss_before / 2**20:.0f} MB -> {rss_after / 2**20:.0f} MB ({growth:+.1f} MB)", "< 50 MB"],
          ]))


if __name__ == "__main__":
    main()
