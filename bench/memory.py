"""The post-steps' memory against the video's frames, and interpolation's time against cores.

1. Peak memory: each case runs in a fresh process through the service's own recipe (`run_task`: segments,
   colour matching, loop, retiming, encoding) with a stand-in generator that hands back deterministic frames of
   the requested size (what the pipeline hands back: the model's own memory is not the post-steps'). Reported:
   the process's peak RSS (VmHWM, reset just before) above its RSS before the first frame existed, against the
   raw bytes of the output frames (frames x width x height x 3). Goal: <= 1.5x. Before this was built, the same
   595-frame 512x288 request (251 MiB of frames) peaked at +1,673 MB (6.7x; issue #20). Encoders run in their
   own processes (ffmpeg), not counted here.
2. Interpolation time: 6 -> 24 fps on 97 frames of 512x288 (388 out), ffmpeg's single-threaded minterpolate in
   1, 2, ... chunks side by side, consumed as the encoder would.

    python bench/memory.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# name, request (as the service resolves it), format
CASES = [
    ("4 segments, ping-pong, 6 -> 18 fps", dict(num_frames=25, segments=4, loop="pingpong",
                                                                    fps=6, output_fps=18), "mp4"),
    ("the same as GIF", dict(num_frames=25, segments=4, loop="pingpong", fps=6, output_fps=18), "gif"),
    ("4 segments, ping-pong, frames ZIP", dict(num_frames=25, segments=4, loop="pingpong", fps=6, output_fps=6),
     "frames"),
    ("2 segments, crossfade, 6 -> 24 fps, WebM", dict(num_frames=25, segments=2, loop="crossfade", fps=6,
                                                      output_fps=24), "webm"),
]


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class Frames:
    """A stand-in generator: the frames a pipeline hands back (a moving gradient with grain), new each call."""

    def __init__(self, family: str = "svd"):
        from video_diffusion.models.contract import ModelInfo

        self.model = ModelInfo(name="stand-in", source=None, noise=True, family=family,
                               defaults={"num_frames": 25, "num_inference_steps": 1, "width": 512, "height": 288,
                                         "fps": 6})

    def generate(self, image, params, progress):
        n, h, w = params["num_frames"], params["height"], params["width"]
        out = np.empty((n, h, w, 3), np.uint8)
        grain = np.random.default_rng(params["seed"]).integers(0, 24, (h, w, 3), dtype=np.uint8)
        ramp = np.linspace(0, 200, w, dtype=np.float32)
        for i in range(n):
            out[i] = (np.roll(ramp, i * 4)[None, :, None] + grain).astype(np.uint8)
            progress("denoising", i, n)
        return out


def child(spec: dict) -> dict:
    from PIL import Image

    from video_diffusion.lifecycle.record import Task
    from video_diffusion.lifecycle.recipe import run_task
    from video_diffusion.params import resolve_defaults

    width, height = spec["size"]
    params = resolve_defaults({**spec["params"], "seed": 1, "width": width, "height": height,
                               "format": spec["format"]}, Frames().model.defaults)
    task = Task(task_id="0" * 32, mode="async", params=params)
    image = Image.new("RGB", (width, height), (90, 120, 150))
    out = Path(tempfile.mkdtemp(prefix="bench-memory-")) / "video"
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    before = _rss("VmRSS")
    started = time.perf_counter()
    run_task(Frames(), task, image, out, lambda *_: None)
    elapsed = time.perf_counter() - started
    frames = task.result["frames"]
    return {"peak_above": _rss("VmHWM") - before, "frames": frames, "frame_bytes": frames * width * height * 3,
            "seconds": elapsed, "file": out.stat().st_size}


def memory_rows(size: tuple[int, int], cases) -> list[list]:
    rows = []
    for name, params, fmt in cases:
        spec = {"params": params, "format": fmt, "size": size}
        result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                text=True, timeout=1800, check=True)
        got = json.loads(result.stdout.strip().splitlines()[-1])
        ratio = got["peak_above"] / got["frame_bytes"]
        rows.append([name, fmt, got["frames"], f"{got['frame_bytes'] / 2**20:.0f} MiB",
                     f"{got['peak_above'] / 2**20:.0f} MiB", f"{ratio:.2f}", "yes" if ratio <= 1.5 else "NO",
                     f"{got['seconds']:.1f} s"])
    return rows


def interpolation_rows(frames: int, size: tuple[int, int]) -> list[list]:
    from video_diffusion.media.postprocess import Clip, interpolation_chunks, motion_interpolate, retimed

    width, height = size
    source = Frames().generate(None, {"num_frames": frames, "height": height, "width": width, "seed": 2},
                               lambda *_: None)
    rows, single = [], None
    for cores in range(1, (os.cpu_count() or 1) + 1):
        def chunked(clip, fps, output_fps, loop, cores=cores):
            return motion_interpolate(clip, fps, output_fps, loop, cores=cores)

        chunks = len(interpolation_chunks(frames, 6, 24, cores, source.nbytes, 4 * source.nbytes)) - 1
        started = time.perf_counter()
        count = sum(1 for _ in retimed(Clip(source), 6, 24, False, interpolate=chunked))
        elapsed = time.perf_counter() - started
        single = single or elapsed
        rows.append([cores, chunks, count, f"{elapsed:.2f} s", f"{single / elapsed:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="128x72 and fewer frames")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    size = (128, 72) if args.smoke else (512, 288)
    cases = CASES[:2] if args.smoke else CASES
    print(f"### Peak memory of the post-steps at {size[0]}x{size[1]}\n\n"
          + table(["request", "format", "output frames", "their bytes", "peak RSS above the start", "peak / bytes",
                   "within 1.5x", "time"], memory_rows(size, cases))
          + "\n\nBefore (this script on commit 52d26ed, the whole-clip post-steps, 512x288): 3.03x, 3.03x, 2.68x and "
            "2.82x in these rows (18.0 s for the first); issue #20 measured 6.7x through the service, the pipeline's "
            "float frames included.\n")
    frames = 25 if args.smoke else 97
    print(f"### Interpolation 6 -> 24 fps against cores ({frames} frames of {size[0]}x{size[1]})\n\n"
          + table(["cores", "chunks", "output frames", "time", "speed-up"], interpolation_rows(frames, size))
          + f"\n\nThis machine has {os.cpu_count()} cores; chunks are bit-identical to one pass in the tests.")


if __name__ == "__main__":
    main()
