"""The full-size SVD-XT architecture, with random weights, through the real service: what `cache_interval` saves
where it matters, before any GPU runs it.

1. Builds (once, into a folder outside the repository) a pipeline with SVD-XT's published configs and random
   weights, saved like the hub repo: fp32 files and an fp16 variant. Real weights cannot be downloaded here; the
   architecture, sizes and code paths are the real ones, the frames are noise.
2. Serves it with `SVD_MODEL=<folder>` through gunicorn (`make run`'s command) and reports the load time, the
   worker's peak RSS, and seconds per denoising step for `cache_interval` 1, 2 and 3 at small sizes, with the
   relative error of the frames against `cache_interval=1` (the reuse is exact nowhere but at 1).
3. Projects GPU time for 1024x576, 25 frames, 25 steps from FLOPs counted per block of the real configs at that
   resolution (torch's FLOP counter on fake tensors: no memory, no compute), scaled to the published anchor
   (50.9 s on an A100, plain diffusers fp16). A projection, labelled as one, not a measurement.

    python bench/full_size.py [--folder DIR] [--sizes 128x128,384x224] [--steps 3]
    python bench/full_size.py --smoke      # the FLOP projection and a tiny served run: checks the script runs
"""

from __future__ import annotations

import argparse
import io
import math
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from common import Service, table

GPU_ANCHOR_SECONDS = 50.9
STEPS_AT_ANCHOR, FRAMES_AT_ANCHOR = 25, 25
DEFAULT_FOLDER = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "video-diffusion" / "svd-xt-random"


# --- the model ----------------------------------------------------------------------------------------

def build(folder: Path) -> float:
    """SVD-XT's architecture with random weights, saved as fp32 and an fp16 variant; seconds it took (0: reused)."""
    if (folder / "model_index.json").exists() and (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists():
        return 0.0
    import torch

    import architectures

    started = time.perf_counter()
    pipe = architectures.build("svd-xt")  # SVD-XT's published configs, random weights
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    return time.perf_counter() - started


# --- served runs --------------------------------------------------------------------------------------

def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def run_one(service: Service, image: bytes, width: int, height: int, steps: int, interval: int) -> dict:
    """One task, followed by polling its status: when each step ended, and its frames."""
    import requests

    data = {"width": str(width), "height": str(height), "num_frames": "14", "num_inference_steps": str(steps),
            "cache_interval": str(interval), "seed": "1", "format": "frames", "decode_chunk_size": "14"}
    answer = requests.post(service.url + "/generate", files={"image": ("in.png", image)}, data=data,
                           headers={"Prefer": "respond-async"}, timeout=60)
    answer.raise_for_status()
    task_id = answer.json()["task_id"]
    marks: dict[int, float] = {}
    while True:
        status = requests.get(f"{service.url}/status/{task_id}", timeout=30).json()
        progress = status["progress"]
        if status["status"] == "started" and progress["phase"] in ("denoising", "decoding"):
            marks.setdefault(progress["step"], time.monotonic())
        if status["status"] in ("finished", "failed", "canceled"):
            break
        time.sleep(0.25)
    if status["status"] != "finished":
        raise RuntimeError(f"task {status['status']}: {status['error']}")
    video = requests.get(f"{service.url}/results/{task_id}", timeout=120).content
    with zipfile.ZipFile(io.BytesIO(video)) as archive:
        frames = np.stack([np.asarray(__import__("PIL.Image").Image.open(io.BytesIO(archive.read(n))))
                           for n in archive.namelist()]).astype(np.float64)
    # From "denoising step 0" (set just before the pipeline call) to the last step: image encoding included, once.
    per_step = (marks[steps] - marks[0]) / steps if 0 in marks and steps in marks else float("nan")
    later = [marks[k + 1] - marks[k] for k in range(1, steps) if k in marks and k + 1 in marks]
    return {"per_step": per_step, "later_steps": later, "frames": frames, "timings": status["timings"]}


def served(folder: Path, sizes: list[tuple[int, int]], steps: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((512, 288)).save(buffer, format="PNG")
    image = buffer.getvalue()
    work = Path(tempfile.mkdtemp(prefix="bench-full-size-"))
    started = time.monotonic()
    service = Service(work, {"SVD_MODEL": str(folder), "JOB_TIMEOUT": "36000", "SYNC_TIMEOUT": "36000",
                             "QUEUE_TIMEOUT": "36000"})
    rows, goals = [], []
    try:
        service.wait_ready(timeout=1800)
        load_seconds = time.monotonic() - started
        for width, height in sizes:
            # A discarded first run at each size: the first pass reads the weights in from disk (the files are
            # mapped lazily) and allocates for the new shapes, which would be charged to interval 1.
            run_one(service, image, width, height, 1, 1)
            runs = {interval: run_one(service, image, width, height, steps, interval) for interval in (1, 2, 3)}
            base = runs[1]
            for interval, run in runs.items():
                error = np.linalg.norm(run["frames"] - base["frames"]) / max(np.linalg.norm(base["frames"]), 1e-9)
                ratio = run["per_step"] / base["per_step"]
                later = f"{np.mean(run['later_steps']):.1f} s" if run["later_steps"] else "n/a"
                rows.append([f"{width}x{height}", interval, f"{run['per_step']:.1f} s", later, f"{ratio:.2f}",
                             f"{error:.4f}"])
                if interval == 3:
                    goals.append([f"s/step at cache_interval=3 / cache_interval=1, {width}x{height}", f"{ratio:.2f}",
                                  "≤ 0.6"])
        peak = peak_rss_bytes(service.worker_pid())
    finally:
        service.stop()
    text = (f"Served with `SVD_MODEL=<folder>` through gunicorn: loaded in {load_seconds:.0f} s (to /health 200), "
            f"worker peak RSS {peak / 2**30:.1f} GiB (float32). 14 frames, {steps} steps, seed 1, format=frames.\n\n"
            + table(["size", "cache_interval", "s/step (all steps)", "s/step (steps 2..N)", "vs interval 1",
                     "relative frame error vs interval 1"], rows)
            + "\n\n" + table(["goal", "measured", "target"], goals))
    return text


# --- the projection -----------------------------------------------------------------------------------

def block_flops(width: int = 1024, height: int = 576, frames: int = FRAMES_AT_ANCHOR) -> dict[str, float]:
    """FLOPs of one UNet call (both guidance halves) per top-level part, and of decoding the frames with the VAE,
    counted with the real configs on fake tensors."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()
        vae = AutoencoderKLTemporalDecoder(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                           latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4)
    unet, vae = unet.to_empty(device="cpu"), vae.to_empty(device="cpu")
    from video_diffusion.models.speedups import install_cross_attention

    install_cross_attention(unet)  # as the service runs it: one-token cross-attention is always on
    h, w = height // 8, width // 8
    unet_counter, vae_counter = FlopCounterMode(display=False, depth=None), FlopCounterMode(display=False, depth=None)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        with unet_counter:
            unet(torch.empty(2, frames, 8, h, w), torch.tensor(1.0), torch.empty(2, 1, 1024),
                 added_time_ids=torch.empty(2, 3))
        with vae_counter:
            vae.decode(torch.empty(frames, 4, h, w), num_frames=frames)
    counts = unet_counter.get_flop_counts()
    parts = {name.split(".", 1)[1]: float(sum(ops.values())) for name, ops in counts.items() if name.count(".") == 2
             or name.endswith("mid_block")}
    parts["total"] = float(sum(counts["Global"].values()))
    parts["vae_decode"] = float(sum(vae_counter.get_flop_counts()["Global"].values()))
    return parts


def _outer_blocks(parts: dict[str, float]) -> tuple[list[str], list[str]]:
    return (sorted(k for k in parts if k.startswith("down_blocks.")),
            sorted(k for k in parts if k.startswith("up_blocks.")))


def cached_step_flops(parts: dict[str, float]) -> float:
    """FLOPs of a step that reuses the deep blocks' output: all but the blocks it skips."""
    down, up = _outer_blocks(parts)
    return parts["total"] - sum(parts[k] for k in down[1:] + ["mid_block"] + up[:-1])


def projection(parts: dict[str, float]) -> str:
    down, up = _outer_blocks(parts)
    shallow = parts[down[0]] + parts[up[-1]]
    full, vae = parts["total"], parts["vae_decode"]
    kept = cached_step_flops(parts)
    rows = [["one UNet call (batch 2)", f"{full / 1e12:.1f}", "100 %"],
            [f"{down[0]} + {up[-1]} (never skipped)", f"{shallow / 1e12:.1f}", f"{100 * shallow / full:.0f} %"],
            ["a cached step (all that is not skipped)", f"{kept / 1e12:.1f}", f"{100 * kept / full:.0f} %"],
            ["VAE decoding of 25 frames", f"{vae / 1e12:.1f}", ""]]
    reference = STEPS_AT_ANCHOR * full + vae
    projected = []
    for interval in (1, 2, 3):
        full_steps = math.ceil(STEPS_AT_ANCHOR / interval)
        work = full_steps * full + (STEPS_AT_ANCHOR - full_steps) * kept + vae
        projected.append([interval, f"{work / 1e12:.0f}", f"{work / reference:.2f}",
                          f"{GPU_ANCHOR_SECONDS * work / reference:.1f} s (projection)"])
    return ("TFLOP at 1024x576, 25 frames (torch's FLOP counter, real configs, fake tensors):\n\n"
            + table(["part", "TFLOP", "share of a UNet call"], rows)
            + f"\n\nProjected GPU time for 1024x576, 25 frames, 25 steps, scaled from {GPU_ANCHOR_SECONDS} s (A100, plain "
              "diffusers fp16) by FLOPs, assuming time follows FLOPs (attention and convolutions run near the same "
              "efficiency on a GPU; image encoding, under 1 TFLOP, left out):\n\n"
            + table(["cache_interval", "TFLOP per video", "vs interval 1", "projected A100 time"], projected))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="where the random-weight model is built")
    parser.add_argument("--sizes", default="128x128,384x224")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the projection, and a tiny model served for 1 size")
    args = parser.parse_args()
    print("### Projection for a GPU\n\n" + projection(block_flops()))  # fake tensors: seconds, even in --smoke
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    if args.smoke:
        from common import tiny_model

        folder, sizes, steps = tiny_model(Path(tempfile.mkdtemp(prefix="bench-full-smoke-"))), [(64, 64)], 3
        built = 0.0
    else:
        folder, steps = args.folder, args.steps
        built = build(folder)
    note = f"built in {built:.0f} s" if built else "reused from an earlier run"
    size_gb = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e9
    print(f"\n### Served on this CPU\n\nModel folder: {'tiny (smoke)' if args.smoke else 'SVD-XT architecture, random weights'}"
          f", {size_gb:.1f} GB on disk (fp32 + fp16 variant), {note}.\n\n" + served(Path(folder), sizes, steps))


if __name__ == "__main__":
    main()
