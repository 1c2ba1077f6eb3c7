"""AnimateLCM-SVD-xt against SVD-XT: UNet work per video, counted on the UNet, and projected GPU time at 1024x576.

The UNet's share of a video is what the consistency model cuts: 4 steps instead of 25. It is counted here as
UNet calls x batch size (2 while guidance is on, 1 at max_guidance_scale <= 1) with tiny random-weight folders
that sample exactly as the real models do (SVD's Euler scheduler, and AnimateLCM's), at a tiny size: the counts
do not depend on the size or the weights. GPU time at 1024x576, 25 frames is projected from the FLOPs of the real
configs at that resolution (bench/full_size.py's counter), scaled to the published anchor: a projection, labelled
as one.

    python bench/animatelcm.py
    python bench/animatelcm.py --smoke     # the same run (it takes seconds): checks the script runs
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import table, tiny_model
from full_size import GPU_ANCHOR_SECONDS, STEPS_AT_ANCHOR, block_flops, cached_step_flops

from config import load_settings
from video_diffusion.params import parse_params, resolve_defaults
from pipeline import load_generator

SVD_XT_WORK = STEPS_AT_ANCHOR * 2  # 25 steps, guidance on: the UNet sees a batch of 2 each time

CONFIGURATIONS = [  # (name, model, request)
    ("svd-xt defaults: 25 steps, guidance 1 to 3", "svd", {"num_inference_steps": "25"}),
    ("animatelcm-svd-xt defaults: 4 steps, guidance 1 to 1.2", "lcm", {}),
    ("animatelcm-svd-xt, max_guidance_scale=1", "lcm", {"max_guidance_scale": "1"}),
    ("animatelcm-svd-xt, cache_interval=2", "lcm", {"cache_interval": "2"}),
]


def count(generator, request: dict) -> dict:
    """Run one video; the batch size of each UNet call and the steps the deep blocks were reused in."""
    from PIL import Image

    batches = []
    handle = generator.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append((args[0] if args else kwargs["sample"]).shape[0]),
        with_kwargs=True)
    cached_before = generator.deep_cache.cached_steps
    params = resolve_defaults(parse_params({**request, "seed": "1", "width": "64", "height": "64",
                                            "num_frames": "14"}), generator.model.defaults)
    try:
        generator.generate(Image.new("RGB", (64, 64), (120, 90, 60)), params, lambda *_: None)
    finally:
        handle.remove()
    return {"batches": batches, "cached": generator.deep_cache.cached_steps - cached_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="accepted for symmetry: the run is already small")
    parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-animatelcm-"))
    generators = {kind: load_generator(load_settings({"SVD_MODEL": str(tiny_model(folder, kind == "lcm"))},
                                                     dotenv_path=None)) for kind in ("svd", "lcm")}
    parts = block_flops()
    full, vae = parts["total"], parts["vae_decode"]  # one UNet call at batch 2; decoding 25 frames
    kept = cached_step_flops(parts)
    reference = STEPS_AT_ANCHOR * full + vae
    rows, work_of = [], {}
    for name, kind, request in CONFIGURATIONS:
        run = count(generators[kind], request)
        calls, work = len(run["batches"]), sum(run["batches"])
        work_of[name] = work
        batch = run["batches"][0]  # the same for every call of a run; FLOPs scale with it
        flops = ((calls - run["cached"]) * full + run["cached"] * kept) * batch / 2 + vae
        rows.append([name, calls, "/".join(sorted({str(b) for b in run["batches"]})), work,
                     f"{work}/{SVD_XT_WORK} = {work / SVD_XT_WORK:.2f}", f"{flops / 1e12:.0f}",
                     f"{GPU_ANCHOR_SECONDS * flops / reference:.1f} s (projection)"])
    goals = [["UNet work with the recommended guidance (max 1.2)", f"{work_of[CONFIGURATIONS[1][0]]}/50", "<= 8/50"],
             ["UNet work at max_guidance_scale=1", f"{work_of[CONFIGURATIONS[2][0]]}/50", "<= 4/50"]]
    print("UNet work per video (calls x batch), counted on the UNet of tiny random-weight folders sampling as the "
          "real models do; TFLOP and time projected for 1024x576, 25 frames from the real configs' FLOPs (a cached "
          f"step counted as the blocks it still runs), scaled from {GPU_ANCHOR_SECONDS} s on an A100 (plain diffusers "
          "fp16, 25 steps):\n\n"
          + table(["configuration", "UNet calls", "batch", "UNet work", "vs SVD-XT", "TFLOP per video",
                   "projected A100 time"], rows)
          + "\n\n" + table(["goal", "measured", "target"], goals)
          + "\n\nThe projection counts a batch-1 UNet call as half a batch-2 one, leaves out image encoding (under 1 "
            "TFLOP) and assumes time follows FLOPs; VAE decoding, the same in every row, is most of what is left once "
            "the UNet does 4 steps.")


if __name__ == "__main__":
    main()
