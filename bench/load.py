"""Load: 16 concurrent clients, 4 requests each, half synchronous and half async, tiny pipeline.

Measures errors, whether the service ran tasks first come first served, throughput against the same requests
sent one by one, /health latency during the run, and the worker's resident memory over 200 generations. The
result cache is off and every submission is checked to be `X-Cache: miss`, so every request generates. Both
phases run under the same /health probing, and the CPU time of the load generator (this process) and of the
service's worker is counted per phase: what the clients cost the two shared cores is measured, not guessed.
Goals: 0 errors, FCFS, throughput >= 0.95x sequential, memory growth < 50 MB.

    python bench/load.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests
from common import Service, cpu_seconds, generated, rss_bytes, table, tiny_model

IMAGE = Path(tempfile.mkdtemp(prefix="bench-load-img-")) / "input.png"


def one_sync(url: str, params: dict) -> tuple[bool, str | None]:
    response = generated(requests.post(url + "/generate", data=params, files={"image": IMAGE.read_bytes()},
                                       timeout=600))
    return response.status_code == 200, response.headers.get("X-Task-Id")


POLL_SECONDS = 1.0  # as demo.sh polls; the web page streams events instead


def one_async(url: str, params: dict) -> tuple[bool, str | None]:
    response = generated(requests.post(url + "/generate", data=params, files={"image": IMAGE.read_bytes()},
                                       headers={"Prefer": "respond-async"}, timeout=60))
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


class Phase:
    """One timed phase: wall time, and the CPU seconds of the load generator and of the service's worker."""

    def __init__(self, worker_pid: int):
        self.worker_pid = worker_pid

    def __enter__(self) -> Phase:
        self._wall, self._client, self._worker = time.perf_counter(), time.process_time(), cpu_seconds(self.worker_pid)
        return self

    def __exit__(self, *_) -> None:
        self.wall = time.perf_counter() - self._wall
        self.client_cpu = time.process_time() - self._client
        self.worker_cpu = cpu_seconds(self.worker_pid) - self._worker


@contextmanager
def probing(url: str, latencies: list[float]) -> Iterator[None]:
    """/health probed every 50 ms while the block runs (both phases alike: the probes are the instrument)."""
    stop = threading.Event()
    watcher = threading.Thread(target=watch_health, args=(url, stop, latencies))
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 clients, 1 request each, 4 for memory, 64x64, 2 steps")
    args = parser.parse_args()
    clients, per_client, memory_requests = (4, 1, 4) if args.smoke else (16, 4, 200)
    params = {"width": "128", "height": "128", "num_inference_steps": "4", "seed": "7"}
    if args.smoke:
        params.update(width="64", height="64", num_inference_steps="2")
    folder = Path(tempfile.mkdtemp(prefix="bench-load-"))
    from PIL import Image

    Image.linear_gradient("L").convert("RGB").resize((320, 240)).save(IMAGE)
    service = Service(folder, {"SVD_MODEL": str(tiny_model(folder)), "MAX_QUEUE": str(clients * per_client + 8)})
    try:
        service.wait_ready()
        pid = service.worker_pid()
        total = clients * per_client
        client(service.url, params, False, 2)  # warm-up

        sequential_latencies: list[float] = []
        with probing(service.url, sequential_latencies), Phase(pid) as one_by_one:
            sequential = client(service.url, params, False, total)

        latencies: list[float] = []
        with probing(service.url, latencies), Phase(pid) as together, ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, service.url, params, i % 2 == 1, per_client) for i in range(clients)]
            concurrent = [r for f in futures for r in f.result()]

        errors = sum(1 for ok, _ in sequential + concurrent if not ok)
        in_order = fcfs(service, [t for ok, t in concurrent if ok])
        rss_before = rss_bytes(pid)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: one_sync(service.url, params), range(memory_requests)))
        rss_after = rss_bytes(pid)
    finally:
        service.stop()
    print(report(clients, per_client, total, one_by_one, together, errors, in_order, latencies,
                 (memory_requests, rss_before, rss_after)))


def report(clients, per_client, total, one_by_one: Phase, together: Phase, errors, in_order, latencies,
           memory) -> str:
    ratio = one_by_one.wall / together.wall
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else latencies[0]
    memory_requests, rss_before, rss_after = memory
    # The cores the load generator took from the service, per phase, and the worker's CPU per generation:
    # the part of the gap the clients explain is the concurrent phase's extra client CPU over two cores.
    cores = os.cpu_count() or 1
    extra_client = together.client_cpu - one_by_one.client_cpu
    explained = extra_client / cores / one_by_one.wall
    rows = [["errors", errors, "0"],
            ["service order first come, first served", "yes" if in_order else "no", "yes"],
            ["sequential", f"{total} in {one_by_one.wall:.1f} s ({total / one_by_one.wall:.2f}/s)", ""],
            ["concurrent", f"{total} in {together.wall:.1f} s ({total / together.wall:.2f}/s)", ""],
            ["throughput concurrent / sequential", f"{ratio:.3f}", "≥ 0.95"],
            ["load generator CPU: sequential / concurrent", f"{one_by_one.client_cpu:.1f} s / "
             f"{together.client_cpu:.1f} s ({100 * one_by_one.client_cpu / one_by_one.wall / cores:.1f} % / "
             f"{100 * together.client_cpu / together.wall / cores:.1f} % of {cores} cores)", ""],
            ["service worker CPU per request: sequential / concurrent",
             f"{one_by_one.worker_cpu / total:.2f} s / {together.worker_cpu / total:.2f} s", ""],
            ["service worker's cores busy: sequential / concurrent",
             f"{one_by_one.worker_cpu / one_by_one.wall:.2f} / {together.worker_cpu / together.wall:.2f} of {cores}", ""],
            ["gap the load generator's extra CPU accounts for", f"{100 * explained:.1f} % of the sequential time "
             f"(gap: {100 * (together.wall / one_by_one.wall - 1):+.1f} %)", ""],
            ["/health latency during the concurrent run", f"p50 {1000 * statistics.median(latencies):.1f} ms, "
             f"p99 {1000 * p99:.1f} ms, max {1000 * max(latencies):.1f} ms ({len(latencies)} probes)", ""],
            [f"worker RSS over {memory_requests} more generations",
             f"{rss_before / 2**20:.0f} MB -> {rss_after / 2**20:.0f} MB "
             f"({(rss_after - rss_before) / 2**20:+.1f} MB)", "< 50 MB"]]
    return (f"{clients} clients x {per_client} requests (half sync, half async), 128x128, 14 frames, 4 steps; "
            "result cache off, every submission `X-Cache: miss`; /health probed every 50 ms in both phases.\n\n"
            + table(["measure", "value", "goal"], rows))


if __name__ == "__main__":
    main()
