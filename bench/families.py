"""Wan and LTX-Video: how much transformer work `cache=fast` saves, counted on the tiny random-weight models.

Each tiny pipeline (tiny-wan, tiny-ltx; 64x64, 9 frames, 8 steps, guidance on, the prompt "a b") runs with
`cache=off` and `cache=fast`; a forward pre-hook on the first linear layer of every transformer block after the
first counts the passes that block really computes (diffusers' First Block Cache computes the first block of
every pass and reuses the others' change when the first block's output barely moved). The ratio is what
`fast` costs of the full work in those blocks; the mean absolute pixel difference says how far the frames moved.
Random weights: the ratio on a trained model depends on how much its features change per step.

    python bench/families.py [--smoke]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import table
from PIL import Image

from pipeline import build_tiny_pipeline
from video_diffusion.models.families import FAMILIES


def measure(family: str, steps: int) -> list:
    from pipeline import VideoGenerator
    from video_diffusion.params import resolve_defaults

    module = FAMILIES[family]
    model = module.describe(module.TINY, None, None)
    generator = VideoGenerator(build_tiny_pipeline(family), model, "cpu", "float32")
    calls = [0]
    for block in list(getattr(generator.pipe.transformer, "blocks", None)
                      or generator.pipe.transformer.transformer_blocks)[1:]:
        linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    results = {}
    for cache in ("off", "fast"):
        params = resolve_defaults({"seed": 1, "cache": cache, "num_inference_steps": steps, "prompt": "a b"},
                                  model.defaults, family)
        calls[0] = 0
        started = time.perf_counter()
        frames = generator.generate(image, params, lambda *_: None)
        results[cache] = (calls[0], time.perf_counter() - started, frames)
    (full, full_s, plain), (cached, cached_s, fast) = results["off"], results["fast"]
    difference = float(np.abs(fast.astype(np.int16) - plain).mean())
    return [model.name, steps, full, cached, f"{cached / full:.2f}", f"{difference:.2f}",
            f"{full_s:.2f} s / {cached_s:.2f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 steps instead of 8")
    steps = 4 if parser.parse_args().smoke else 8
    rows = [measure(family, steps) for family in ("wan", "ltx")]
    print("Tiny random-weight pipelines, 64x64, 9 frames, guidance on (Wan: two transformer passes per step; "
          "LTX-Video: one pass on a batch of two), CPU.\n\n"
          + table(["model", "steps", "tail-block passes, cache=off", "cache=fast", "fast / off",
                   "mean abs pixel difference", "time off / fast"], rows))


if __name__ == "__main__":
    main()
