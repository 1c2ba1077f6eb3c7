"""Where one generation's time and GPU memory go: prompt and image encoding, each denoising step, VAE decoding,
video encoding, for the default settings and for each speed or memory option the service offers, for any family.

    python bench/gpu_stages.py --model svd-xt                           # on a CUDA machine: the real thing
    python bench/gpu_stages.py --model wan2.2-ti2v-5b --random-weights  # a CUDA machine without the hub: the
                                                                        # published architecture, random weights
    python bench/gpu_stages.py --model tiny --smoke                     # anywhere: checks the script runs
    python bench/gpu_stages.py --model tiny-wan --smoke                 # (tiny-ltx likewise)

--random-weights builds svd-xt, wan2.2-ti2v-5b, wan2.1-i2v-14b-480p/720p or ltx-video from its published configs
(bench/architectures.py) directly on the GPU (on the host for the offload rows) and serves it through the service's
own preparation (offload, tiling, compile, cache): step times and peak memory are the real model's; the frames are
noise. The AnimateLCM rows (SVD) load `animatelcm-svd-xt` beside a real model, and a tiny random-weight folder with
its sampler beside `tiny`.

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
from pipeline import ANIMATELCM, CUDA_DTYPES, REPOS, describe_model, load_generator, prepare_generator
from video_diffusion.params import parse_params, resolve_defaults, schema_for

ANCHORS = {
    "svd": ("Published anchors for SVD-XT, 25 frames at 1024x576, 25 steps: about 51 s on an A100 in plain "
            "diffusers fp16; about 22.6 s on an H100 PCIe with TensorRT; a compute floor of about 4,170 TFLOP "
            "per video."),
    "wan": ("Published anchors: Wan 2.2 TI2V-5B, 1280x704, 121 frames, 50 steps: 524.8 s on one RTX 4090; Wan 2.1 "
            "I2V 14B at 720p: 1491.6 s on one H100 (the Wan repositories). bench/families.py projects both from "
            "FLOPs."),
    "ltx": ("Published anchor: LTX-Video, 5 s of 768x512 video in about 2 s on an H100 with its distilled few-step "
            "setting (arXiv 2501.00103)."),
}
OFFLOAD = [("SVD_OFFLOAD=model", {"SVD_OFFLOAD": "model"}, {}),
           ("SVD_OFFLOAD=group", {"SVD_OFFLOAD": "group"}, {}),
           ("SVD_OFFLOAD=sequential", {"SVD_OFFLOAD": "sequential"}, {})]


def configurations(family: str, smoke: bool, animatelcm: str) -> list[tuple[str, dict, dict]]:
    """(name, settings overrides, request overrides). `animatelcm`: the SVD_MODEL of the AnimateLCM rows."""
    if family != "svd":  # Wan and LTX-Video: the block cache, VAE tiling, offload, compile
        configs = [("default", {}, {}), ("cache=fast", {}, {"cache": "fast"}),
                   ("VAE_TILING=true", {"VAE_TILING": "true"}, {}), *OFFLOAD]
        if not smoke:
            configs += [("SVD_COMPILE=true", {"SVD_COMPILE": "true"}, {}),
                        ("SVD_COMPILE=true, cache=fast", {"SVD_COMPILE": "true"}, {"cache": "fast"})]
        return configs
    configs = [("default", {}, {}), ("SVD_FORWARD_CHUNKING=true", {"SVD_FORWARD_CHUNKING": "true"}, {})]
    configs += [(f"decode_chunk_size={n}", {}, {"decode_chunk_size": str(n)}) for n in (1, 4, 16)]
    configs += [(f"cache_interval={n}", {}, {"cache_interval": str(n)}) for n in (2, 3)]
    steps = {"num_inference_steps": "4"} if smoke else {}  # its own default, 4, outside --smoke
    configs += [("animatelcm-svd-xt, 4 steps, guidance to 1.2", {"SVD_MODEL": animatelcm}, steps),
                ("animatelcm-svd-xt, 4 steps, max_guidance_scale=1", {"SVD_MODEL": animatelcm},
                 {**steps, "max_guidance_scale": "1"})]
    configs += OFFLOAD
    if not smoke:
        configs.append(("SVD_COMPILE=true", {"SVD_COMPILE": "true"}, {}))
        configs.append(("SVD_COMPILE=true, cache_interval=3", {"SVD_COMPILE": "true"}, {"cache_interval": "3"}))
    return configs


STAGES = (("text_encoder", "forward", "prompt encoding"), ("image_encoder", "forward", "image encoding"),
          ("vae", "encode", "image encoding"), ("vae", "decode", "VAE decoding"))


class StageClock:
    """Times the stages by wrapping the pipeline's own parts (text and image encoders, the VAE's encode and
    decode: every family has the same names); synchronises CUDA so times are real."""

    def __init__(self, generator):
        import torch

        self.torch, self.cuda = torch, generator.device == "cuda"
        self.times: dict[str, float] = {}
        self._restore = []
        for part, method, stage in STAGES:
            module = getattr(generator.pipe, part, None)
            if module is not None:
                original = getattr(module, method)
                setattr(module, method, self._timed(original, stage))
                self._restore.append((module, method, vars(module).get(method)))
        self.step_marks: list[float] = []

    def close(self) -> None:
        for module, method, own in self._restore:  # an offload hook's forward is the module's own: put it back
            if own is None:
                vars(module).pop(method, None)
            else:
                setattr(module, method, own)

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


def load(settings, random_weights: bool):
    """The generator the settings name: loaded as the service loads it, or (random_weights) the named model's
    published architecture built with random weights and prepared by the service's own code."""
    if not random_weights:
        return load_generator(settings)
    import torch

    import architectures

    if not torch.cuda.is_available() and settings.svd_offload != "none":
        raise RuntimeError(f"SVD_OFFLOAD={settings.svd_offload} needs a CUDA device")
    model = describe_model(settings, gpu=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = CUDA_DTYPES[model.family] if device == "cuda" else "float32"
    built_on = device if settings.svd_offload == "none" else "cpu"  # offload starts from the host
    pipe = architectures.build(model.name, device=built_on, dtype=getattr(torch, dtype_name))
    return prepare_generator(pipe, model, settings, device, dtype_name)


def measure(name: str, settings_env: dict, request: dict, base_env: dict, image, repeats: int,
            random_weights: bool = False) -> list[object]:
    settings = load_settings({**base_env, **settings_env}, dotenv_path=None)
    try:
        generator = load(settings, random_weights and ANIMATELCM not in settings_env.get("SVD_MODEL", ""))
    except RuntimeError as exc:  # e.g. offload without CUDA
        return [name, "skipped", "", "", "", "", "", "", str(exc).split(";")[0]]
    model = generator.model
    schema = schema_for(model.family, max_dimension=2048, max_steps=100, frames=model.frames,
                        size_multiple=model.size_multiple, fps=model.defaults.get("fps", 6))
    params = resolve_defaults(parse_params(request, schema), model.defaults, model.family)
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
        clock.close()
        steps = [b - a for a, b in zip(clock.step_marks, clock.step_marks[1:])]
        # The first interval also holds the prompt and image encoding (they run before the first step).
        steps[0] -= clock.times.get("prompt encoding", 0.0) + clock.times.get("image encoding", 0.0)
        if attempt:
            runs.append({"prompt encoding": clock.times.get("prompt encoding", 0.0),
                         "image encoding": clock.times.get("image encoding", 0.0), "denoising": sum(steps),
                         "step": statistics.median(steps), "VAE decoding": clock.times.get("VAE decoding", 0.0),
                         "video encoding": encoded - generated, "total": encoded - started,
                         "peak": torch.cuda.max_memory_allocated() if clock.cuda else None})
    run = {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None for key in runs[0]}
    total = run["total"]
    shares = " / ".join(f"{100 * run[k] / total:.0f}%" for k in ("prompt encoding", "image encoding", "denoising",
                                                                 "VAE decoding", "video encoding"))
    peak = f"{run['peak'] / 2**30:.2f} GiB" if run["peak"] is not None else "n/a (cpu)"
    prompted = getattr(generator.pipe, "text_encoder", None) is not None
    return [name, f"{run['prompt encoding']:.2f} s" if prompted else "none", f"{run['image encoding']:.2f} s",
            f"{run['denoising']:.2f} s ({run['step']:.3f} s/step)", f"{run['VAE decoding']:.2f} s",
            f"{run['video encoding']:.2f} s", f"{total:.2f} s", peak, shares]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="svd-xt", help="MODEL: svd-xt, wan2.2-ti2v-5b, ltx-video, a folder, tiny, "
                                                          "tiny-wan, tiny-ltx, ...")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the named model's published architecture with random weights (no download)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run per configuration")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from PIL import Image

    base_env = {"SVD_MODEL": args.model}
    family = describe_model(load_settings(base_env, dotenv_path=None), gpu=True).family
    if args.random_weights:
        import architectures

        if args.model not in architectures.NAMES:
            parser.error(f"--random-weights builds {', '.join(architectures.NAMES)}")
    image = Image.linear_gradient("L").convert("RGB").resize((1024, 576))
    request = {"seed": "1"}
    if args.smoke:
        request.update(num_inference_steps="2", width="64", height="64")
    # The AnimateLCM rows: the real model beside a real one; beside random weights, random weights sampled as it is.
    real = args.model in REPOS or args.model == ANIMATELCM
    animatelcm = ANIMATELCM if real else (str(tiny_model(Path(tempfile.mkdtemp(prefix="bench-stages-")), True))
                                          if family == "svd" else "")
    rows = [measure(name, env, {**request, **extra}, base_env, image, 1 if args.smoke else args.repeats,
                    args.random_weights)
            for name, env, extra in configurations(family, args.smoke, animatelcm)]
    header = ["configuration", "prompt encoding", "image encoding", "denoising", "VAE decoding", "video encoding",
              "total", "peak GPU memory", "share: prompt / image / denoise / decode / encode"]
    what = "64x64, 2 steps (animatelcm: 4), the model's frames" if args.smoke else "the model's own defaults"
    weights = "; random weights in the published architecture" if args.random_weights else ""
    print(f"Model `{args.model}` ({family}), {what}{weights}; median of {args.repeats} after a warm-up.\n\n"
          f"{table(header, rows)}\n\n{ANCHORS[family]}")


if __name__ == "__main__":
    main()
