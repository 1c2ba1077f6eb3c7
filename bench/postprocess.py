"""What the steps after the model cost, and how fast a repeat is answered from the result cache.

Post-steps on 25 frames at 1024x576 of a moving synthetic scene (as the encoder benchmark): interpolation
6 -> 24 fps, ping-pong, crossfade, colour matching of a chained segment, and the frames ZIP; each as a share of
the GPU anchor's generation time (SVD-XT, 25 frames at 1024x576, 25 steps: 50.9 s on an A100 in plain diffusers
fp16). The post-steps run on the CPU of whatever machine serves, so these CPU times are what a GPU box pays too
(its CPU is usually faster than these 2 cores).

Result cache: the real service (gunicorn, tiny model, 256x144, 14 frames, 8 steps), the first request naming
its seed against the median of identical repeats (X-Cache: hit), over HTTP on the loopback.

    python bench/postprocess.py [--smoke]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from common import Service, generated, median_seconds, table, tiny_model
from encoding import moving_scene

from encoders import encode_video
from video_diffusion.media.postprocess import colour_stats, make_loop, match_colours, retime

GPU_ANCHOR_SECONDS = 50.9


def post_steps(frames: np.ndarray, repeats: int) -> str:
    folder = Path(tempfile.mkdtemp(prefix="bench-post-"))
    reference = colour_stats(frames)
    drifted = np.clip(frames.astype(np.int16) * 1.1 + 12, 0, 255).astype(np.uint8)
    steps = [
        ("interpolation 6 -> 24 fps (minterpolate)", lambda: retime(frames, 6, 24, looped=False)),
        ("interpolation 6 -> 24 fps across a ping-pong loop", lambda: retime(make_loop(frames, "pingpong"), 6, 24,
                                                                              looped=True)),
        ("ping-pong", lambda: make_loop(frames, "pingpong")),
        ("crossfade", lambda: make_loop(frames, "crossfade")),
        ("colour matching (one chained segment)", lambda: match_colours(drifted, reference)),
        ("frames ZIP (PNG)", lambda: encode_video(frames, 6, "frames", str(folder / "frames.zip"))),
    ]
    rows = []
    for name, step in steps:
        seconds = median_seconds(step, 1 if name.startswith("interpolation") else repeats)
        rows.append([name, f"{seconds:.3f} s", f"{100 * seconds / GPU_ANCHOR_SECONDS:.2f} %"])
    shape = f"{len(frames)} frames at {frames.shape[2]}x{frames.shape[1]}"
    return (f"{shape}; median of {repeats} (interpolation: one run).\n\n"
            + table(["post-step", "time", f"share of {GPU_ANCHOR_SECONDS} s (GPU anchor)"], rows)
            + "\n\nInterpolation is the one post-step that costs: ffmpeg's `minterpolate` runs on one core, in time "
              "proportional to the frames it reads (a ping-pong loop doubles them).")


def cache_latency(repeats: int, smoke: bool) -> str:
    import requests

    folder = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    service = Service(folder, {"SVD_MODEL": str(tiny_model(folder))}, result_cache=True)
    try:
        service.wait_ready()
        buffer = io.BytesIO()
        Image.new("RGB", (256, 144), (90, 140, 200)).save(buffer, format="PNG")
        params = {"seed": "7", "num_inference_steps": "2" if smoke else "8"}

        def post() -> requests.Response:
            return requests.post(service.url + "/generate", files={"image": ("in.png", buffer.getvalue())},
                                 data=params, timeout=300)

        started = time.perf_counter()
        first = generated(post())  # a fresh service: the first answer must be a generation
        first_seconds = time.perf_counter() - started
        hits = []
        for _ in range(repeats):
            started = time.perf_counter()
            again = post()
            hits.append(time.perf_counter() - started)
            assert again.headers["X-Cache"] == "hit" and again.content == first.content
    finally:
        service.stop()
    hit = statistics.median(hits)
    rows = [["first request (generated)", f"{first_seconds:.3f} s"], [f"repeat, median of {repeats} (hit)",
                                                                      f"{hit:.3f} s"]]
    goals = [["hit / first", f"{hit / first_seconds:.3f}", "< 0.2"]]
    return ("Tiny model, 256x144, 14 frames, {} steps, mp4, through gunicorn on the loopback.\n\n".format(
        params["num_inference_steps"]) + table(["request", "time"], rows) + "\n\n"
        + table(["goal", "measured", "target"], goals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small frames, few repeats: checks the script runs")
    args = parser.parse_args()
    frames = moving_scene(25, 96, 160) if args.smoke else moving_scene(25, 576, 1024)
    print("### Post-steps\n\n" + post_steps(frames, 1 if args.smoke else 5))
    print("\n### Result cache\n\n" + cache_latency(2 if args.smoke else 10, args.smoke))


if __name__ == "__main__":
    main()
