"""Hostile clients: slow connections and event streams held while /health is probed, and the worker's peak
memory per upload of a 40 MP image by type (one upload at a time, then four at once). Loopback only.

Goals: every slow connection held without a thread (/health p99 < 1 s with 64 trickling + 32 streams +
8 waiting clients); peak RSS per 40 MP upload < 250 MB, four 6300x6300 16-bit PNGs at once < 500 MB.

    python bench/hostile.py [--smoke]
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from common import Service, table, tiny_model
from video_diffusion.media.images import WEBP_SHARE
from PIL import Image, ImageDraw

SMALL = {"width": "64", "height": "64", "num_inference_steps": "1", "num_frames": "14"}


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def images(side: int) -> dict[str, bytes]:
    """Images of side x side that compress small and decode big, by type (WebP at its own, lower limit)."""
    picture = _picture(side)
    webp_side = int((side * side // WEBP_SHARE) ** 0.5)
    out = {}
    for name, image, fmt, options in (
            ("PNG 16-bit grey", Image.fromarray(np.zeros((side, side), np.uint16)), "PNG", {"compress_level": 9}),
            ("PNG RGBA", picture.convert("RGBA"), "PNG", {"compress_level": 9}),
            ("JPEG", picture, "JPEG", {"quality": 85}),
            (f"WebP ({webp_side}x{webp_side})", _picture(webp_side), "WEBP", {"quality": 80})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        out[name] = buffer.getvalue()
    return out


def _picture(side: int) -> Image.Image:
    """A few shapes on a flat ground: compresses small (as in the reports), decodes to full size."""
    picture = Image.new("RGB", (side, side), (40, 90, 160))
    draw = ImageDraw.Draw(picture)
    for i in range(12):
        draw.rectangle((i * side // 13, i * side // 17, i * side // 13 + side // 9, i * side // 17 + side // 7),
                       fill=(20 * i, 255 - 20 * i, 128))
    return picture


def _peak_kb(pid: int) -> int:
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM")))


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def upload_memory(service: Service, pid: int, data: bytes, at_once: int) -> float:
    """The worker's peak RSS growth (MB) while `at_once` copies of `data` are uploaded and decoded."""
    _reset_peak(pid)
    base = _peak_kb(pid)

    def post(_):
        response = requests.post(service.url + "/generate", files={"image": ("i", data, "application/octet-stream")},
                                 data=SMALL, headers={"Prefer": "respond-async"}, timeout=120)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    with ThreadPoolExecutor(at_once) as pool:
        task_ids = list(pool.map(post, range(at_once)))
    growth = (_peak_kb(pid) - base) / 1024
    for task_id in task_ids:  # let the line empty before the next measurement
        while requests.get(f"{service.url}/status/{task_id}", timeout=10).json()["status"] in ("queued", "started"):
            time.sleep(0.05)
    return growth


def hostile_load(service: Service, slow: int, streams: int, waiting: int, probes: int) -> dict:
    stop = threading.Event()
    sockets = []
    for _ in range(slow):
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        sock.sendall(b"GET /params HTTP/1.1\r\nHost: x\r\n")
        sockets.append(sock)

    def trickle():
        for _ in range(120):
            if stop.wait(1.0):
                return
            for sock in sockets[:slow]:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    image = _png_bytes()
    holder = requests.post(service.url + "/generate", files={"image": image}, data=dict(SMALL, num_inference_steps="100"),
                           headers={"Prefer": "respond-async"}, timeout=30).json()["task_id"]
    opened = 0
    for _ in range(streams):
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        sock.sendall(f"GET /status/{holder}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        opened += sock.recv(4096).split(b" ", 2)[1] == b"200"
        sockets.append(sock)
    pool = ThreadPoolExecutor(waiting)
    futures = [pool.submit(requests.post, service.url + "/generate", files={"image": image}, data=SMALL,
                           timeout=120) for _ in range(waiting)]
    time.sleep(1.0)
    latencies = []
    for _ in range(probes):
        started = time.perf_counter()
        requests.get(service.url + "/health", timeout=10)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    stop.set()
    requests.delete(f"{service.url}/tasks/{holder}", timeout=10)
    ok = sum(f.result().status_code == 200 for f in futures)
    pool.shutdown()
    for sock in sockets:
        sock.close()
    latencies.sort()
    return {"slow": slow, "streams_open": opened, "streams_refused": streams - opened, "waiting_ok": ok,
            "waiting": waiting, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    smoke = parser.parse_args().smoke
    side = 1000 if smoke else 6324  # 6324^2 = 40.0 MP, MAX_IMAGE_PIXELS' default
    folder = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    service = Service(folder, {"SVD_MODEL": str(tiny_model(folder))})
    try:
        service.wait_ready()
        pid = service.worker_pid()
        load = hostile_load(service, *((8, 4, 2, 20) if smoke else (64, 32, 8, 200)))
        upload = images(side)
        rows = [[name, f"{len(data) / 1024:.0f} KB", f"{upload_memory(service, pid, data, 1):.0f} MB", "< 250 MB"]
                for name, data in upload.items()]
        four_side = 1000 if smoke else 6300
        four = upload_memory(service, pid, images(four_side)["PNG 16-bit grey"], 4)
    finally:
        service.stop()
    print(f"Tiny pipeline, `make run`'s gunicorn settings; uploads of {side}x{side} images (WebP: MAX_IMAGE_PIXELS/"
          f"{WEBP_SHARE}, its limit), async, one at a time.\n")
    print(table(["load", "value"], [
        ["connections trickling headers (a line a second)", load["slow"]],
        ["event streams asked for / open / refused 503", f"{load['streams_open'] + load['streams_refused']} / "
                                                         f"{load['streams_open']} / {load['streams_refused']}"],
        ["synchronous clients waiting, answered 200", f"{load['waiting']}, {load['waiting_ok']}"],
        ["/health p50 / p99 under that load", f"{load['p50'] * 1000:.1f} ms / {load['p99'] * 1000:.1f} ms"]]))
    print()
    print(table(["upload", "size", "worker peak RSS growth", "goal"], rows))
    print()
    print(table(["goal", "measured", "target"], [
        ["/health p99 with slow connections, streams and waiting clients", f"{load['p99'] * 1000:.0f} ms",
         "< 1000 ms"],
        [f"four {four_side}x{four_side} 16-bit PNGs at once: worker peak RSS growth", f"{four:.0f} MB", "< 500 MB"]]))


if __name__ == "__main__":
    main()
