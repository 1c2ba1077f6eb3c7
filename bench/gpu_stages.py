"""Where one generation's time and GPU memory go: image encoding, each denoising step, VAE decoding, video
encoding, for the default settings and for each speed or memory option the service offers.

    python bench/gpu_stages.py --model svd-xt            # on a CUDA machine: the real thing
    python bench/gpu_stages.py --model tiny --smoke      # anywhere: checks the script runs

The AnimateLCM rows load `animatelcm-svd-xt` beside a real model, and a tiny random-weight folder with its
sampler beside `tiny`.

Options that need CUDA (offload modes) are reported as skipped elsewhere; torch.compile is skipped in
--smoke (its first call compiles for minutes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import table, tiny_model

from config import load_settings
from encoders import encode_video
from video_diffusion.params import parse_params, resolve_defaults
from pipeline import ANIMATELCM, REPOS, load_generator

ANCHORS = ("Published anchors for SVD-XT, 25 frames at 1024x576, 25 steps: about 51 s on an A100 in plain "
           "diffusers fp16; about 22.6 s on an H100 PCIe with TensorRT; a compute floor of about 4,170 TFLOP "
           "per video.")


def configurations(smoke: bool, animatelcm: str) -> list[tuple[str, dict, dict]]:
    """(name, settings overrides, request overrides). `animatelcm`: the SVD_MODEL of the AnimateLCM rows."""
    configs = [("default", {}, {}), ("SVD_FORWARD_CHUNKING=true", {"SVD_FORWARD_CHUNKING": "true"}, {})]
    configs += [(f"decode_chunk_size={n}", {}, {"decode_chunk_size": str(n)}) for n in (1, 4, 16)]
    configs += [(f"cache_interval={n}", {}, {"cache_interval": str(n)}) for n in (2, 3)]
    steps = {"num_inference_steps": "4"} if smoke else {}  # its own default, 4, outside --smoke
    configs += [("animatelcm-svd-xt, 4 steps, guidance to 1.2", {"SVD_MODEL": animatelcm}, steps),
                ("animatelcm-svd-xt, 4 steps, max_guidance_scale=1", {"SVD_MODEL": animatelcm},
                 {**steps, "max_guidance_scale": "1"})]
    configs += [("SVD_OFFLOAD=model", {"SVD_OFFLOAD": "model"}, {}),
                ("SVD_OFFLOAD=sequential", {"SVD_OFFLOAD": "sequential"}, {})]
    if not smoke:
        configs.append(("SVD_COMPILE=true", {"SVD_COMPILE": "true"}, {}))
        configs.append(("SVD_COMPILE=true, cache_interval=3", {"SVD_COMPILE": "true"}, {"cache_interval": "3"}))
    return configs


class StageClock:
    """Times the pipeline's stages by wrapping its own methods; synchronises CUDA so times are real."""

    def __init__(self, generator):
        import torch

        self.torch, self.cuda = torch, generator.device == "cuda"
        self.times: dict[str, float] = {}
        pipe = generator.pipe
        for attribute, stage in (("_encode_image", "image encoding"), ("_encode_vae_image", "image encoding"),
                                 ("decode_latents", "VAE decoding")):
            setattr(pipe, attribute, self._timed(getattr(pipe, attribute), stage))
        self.step_marks: list[float] = []

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _timed(self, method, stage):
        def wrapper(*args, **kwargs):
            started = self.now()
            result = method(*args, **kwargs)
            self.times[stage] = self.times.get(stage, 0.0) + self.now() - started
            return result

        return wrapper

    def progress(self, phase: str, step: int, total: int) -> None:
        self.step_marks.append(self.now())


def measure(name: str, settings_env: dict, request: dict, base_env: dict, image, repeats: int) -> list[object]:
    settings = load_settings({**base_env, **settings_env}, dotenv_path=None)
    try:
        generator = load_generator(settings)
    except RuntimeError as exc:  # e.g. offload without CUDA
        return [name, "skipped", "", "", "", "", "", str(exc).split(";")[0]]
    params = resolve_defaults(parse_params(request), generator.model.defaults)
    sized = image.resize((params["width"], params["height"]))
    torch = __import__("torch")
    runs = []
    for attempt in range(repeats + 1):  # the first is a warm-up (lazy initialisation, compilation)
        clock = StageClock(generator)
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats()
        started = clock.now()
        frames = generator.generate(sized, params, clock.progress)
        generated = clock.now()
        encode_video(frames, params["fps"], "mp4", "/tmp/bench-gpu-stages.mp4")
        encoded = clock.now()
        steps = [b - a for a, b in zip(clock.step_marks, clock.step_marks[1:])]
        steps[0] -= clock.times.get("image encoding", 0.0)  # the first interval also holds the image encoding
        if attempt:
            runs.append({"image encoding": clock.times.get("image encoding", 0.0), "denoising": sum(steps),
                         "step": statistics.median(steps), "VAE decoding": clock.times.get("VAE decoding", 0.0),
                         "video encoding": encoded - generated, "total": encoded - started,
                         "peak": torch.cuda.max_memory_allocated() if clock.cuda else None})
    run = {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None for key in runs[0]}
    total = run["total"]
    shares = " / ".join(f"{100 * run[k] / total:.0f}%" for k in ("image encoding", "denoising", "VAE decoding",
                                                                 "video encoding"))
    peak = f"{run['peak'] / 2**30:.2f} GiB" if run["peak"] is not None else "n/a (cpu)"
    return [name, f"{run['image encoding']:.2f} s", f"{run['denoising']:.2f} s ({run['step']:.3f} s/step)",
            f"{run['VAE decoding']:.2f} s", f"{run['video encoding']:.2f} s", f"{total:.2f} s", peak, shares]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="svd-xt", help="SVD_MODEL: svd-xt, svd, a folder, or tiny")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run per configuration")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from PIL import Image

    image = Image.linear_gradient("L").convert("RGB").resize((1024, 576))
    request = {"seed": "1", "num_inference_steps": "2", "width": "64", "height": "64"} if args.smoke else {"seed": "1"}
    base_env = {"SVD_MODEL": args.model}
    # The AnimateLCM rows: the real model beside a real one; beside random weights, random weights sampled as it is.
    real = args.model in REPOS or args.model == ANIMATELCM
    animatelcm = ANIMATELCM if real else str(tiny_model(Path(tempfile.mkdtemp(prefix="bench-stages-")), True))
    rows = [measure(name, env, {**request, **extra}, base_env, image, 1 if args.smoke else args.repeats)
            for name, env, extra in configurations(args.smoke, animatelcm)]
    header = ["configuration", "image encoding", "denoising", "VAE decoding", "video encoding", "total",
              "peak GPU memory", "share: image / denoise / decode / encode"]
    what = ("64x64, 14 frames, 2 steps (animatelcm: 4)" if args.smoke
            else "the model's own defaults (svd-xt: 1024x576, 25 frames, 25 steps; animatelcm-svd-xt: 4 steps)")
    print(f"Model `{args.model}`, {what}; median of {args.repeats} after a warm-up.\n\n{table(header, rows)}\n\n{ANCHORS}")


if __name__ == "__main__":
    main()
