"""Helpers the benchmarks share: timing, PSNR, decoding, and markdown tables."""

from __future__ import annotations

import io
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def psnr(decoded: np.ndarray, source: np.ndarray) -> float:
    error = np.mean((decoded.astype(np.float64) - source.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


def decode(data: bytes, fmt: str) -> np.ndarray:
    """Frames of an encoded video: PyAV for mp4/webm, Pillow for gif/webp (PyAV cannot read animated WebP)."""
    if fmt in ("mp4", "webm"):
        import av

        with av.open(io.BytesIO(data)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        frames = []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
        return np.stack(frames)


def moov_before_mdat(data: bytes) -> bool:
    offset, boxes = 0, []
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        boxes.append(kind)
        if size < 8:
            break
        offset += size
    return b"moov" in boxes and b"mdat" in boxes and boxes.index(b"moov") < boxes.index(b"mdat")


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CacheHit(RuntimeError):
    """A timed request was answered from the result cache: the benchmark would time a look-up, not a generation."""


def generated(response):
    """The response, once it is known to come from a generation (`X-Cache` absent or `miss`); else CacheHit."""
    if response.headers.get("X-Cache", "miss") != "miss":
        raise CacheHit(f"a timed request was answered from the result cache (X-Cache: {response.headers['X-Cache']}):"
                       " this benchmark must time generations")
    return response


class Service:
    """The service as `make run` starts it (gunicorn, gunicorn.conf.py) on a free loopback port.

    The result cache is off unless asked for: a benchmark that repeats a seeded request times generations.
    """

    def __init__(self, folder: Path, env: dict[str, str], result_cache: bool = False):
        import os
        import subprocess

        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = folder / "videos"
        self.log_path = folder / "gunicorn.log"
        self.process = subprocess.Popen(
            # From its own folder (no `.env` there), with the code importable: the defaults are what is measured.
            [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py")], cwd=folder,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HOST": "127.0.0.1", "PORT": str(self.port), "VIDEO_OUTPUT_PATH": str(self.output),
                 "MALLOC_ARENA_MAX": "2",  # as `make run` and the image set it
                 "RESULT_CACHE": str(result_cache).lower(), **env},
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the service did not start:\n" + self.log_path.read_text())

    def worker_pid(self) -> int:
        import re

        return int(re.search(r"Booting worker with pid: (\d+)", self.log_path.read_text()).group(1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (/proc/<pid>/stat, fields 14 and 15)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def tiny_model(folder: Path, animatelcm: bool = False) -> Path:
    """A tiny random-weight pipeline saved in `folder`, or the one `BENCH_TINY_MODEL` names (the smoke tests pass
    theirs: a script that only serves it then never imports torch itself)."""
    import os

    from pipeline import save_tiny_pipeline

    if not animatelcm and os.environ.get("BENCH_TINY_MODEL"):
        return Path(os.environ["BENCH_TINY_MODEL"])
    path = folder / ("tiny-animatelcm" if animatelcm else "tiny-svd")
    save_tiny_pipeline(path, animatelcm=animatelcm)
    return path
