"""Wan and LTX-Video: transformer work per video at each model's defaults, and what `cache=fast` saves.

FLOPs: the published transformer configs built on fake tensors (no weights, no memory), one call at the model's
default size and frames counted with torch's FLOP counter (linear layers, and attention through a formula for the
CPU attention kernel the counter does not know), times the calls a video makes (steps x 2 with guidance for Wan,
which runs the two halves separately; steps for LTX-Video, which runs them as one batch of two). VAE and text
encoder left out. Projected times scale SVD-XT's anchor (4,170 TFLOP in about 51 s on an A100 in plain diffusers
fp16, ~82 TFLOP/s) by FLOPs, the H100 by its peak over the A100's (989 / 312 dense BF16): what the SVD rows assume,
set beside the times the models' authors published.

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
import architectures
import torch
from common import table
from PIL import Image

from pipeline import blocks_of, build_tiny_pipeline
from video_diffusion.models.families import FAMILIES


SVD_ANCHOR = (4170.0, 50.9)  # TFLOP per SVD-XT video, seconds on an A100 (plain diffusers fp16)
H100_OVER_A100 = 989 / 312
# name: (call inputs, calls per video, published anchor); the transformers' configs are bench/architectures.py's
CONFIGS = {
    # 1280x704, 121 frames: 31 latent frames of 44x80 (x16 VAE), 2x2 patches; one timestep per token
    "wan2.2-ti2v-5b": (lambda torch: dict(hidden_states=torch.empty(1, 48, 31, 44, 80),
                                          timestep=torch.ones(1, 31 * 22 * 40),
                                          encoder_hidden_states=torch.empty(1, 512, 4096)), 50 * 2,
                       "720p (1280x704, 121 frames): 524.8 s on one RTX 4090 (Wan2.2 repo)"),
    # 1280x720, 81 frames: 21 latent frames of 90x160 (x8 VAE), 2x2 patches; 257 CLIP image tokens
    "wan2.1-i2v-14b-720p": (lambda torch: dict(hidden_states=torch.empty(1, 36, 21, 90, 160), timestep=torch.ones(1),
                                               encoder_hidden_states=torch.empty(1, 512, 4096),
                                               encoder_hidden_states_image=torch.empty(1, 257, 1280)), 50 * 2,
                            "720p: 1491.6 s on one H100, 2715.5 s on an A100 (Wan2.1 repo)"),
    # 704x480, 161 frames: 21 latent frames of 15x22 (x32 VAE, x8 in time), as a sequence; guidance as a batch
    "ltx-video": (lambda torch: dict(hidden_states=torch.empty(2, 21 * 15 * 22, 128),
                                     encoder_hidden_states=torch.empty(2, 128, 4096), timestep=torch.ones(2, 1),
                                     encoder_attention_mask=torch.ones(2, 128), num_frames=21, height=15, width=22,
                                     rope_interpolation_scale=(8 / 24, 32, 32)), 50,
                  "5 s of 768x512 at 24 fps in about 2 s on an H100 (arXiv 2501.00103; its distilled, few-step "
                  "setting)"),
}


def call_tflop(name: str) -> float:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    inputs, _, _ = CONFIGS[name]
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention})
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = architectures.denoiser(name)
        with counter, torch.no_grad():
            model(**inputs(torch), return_dict=False)
    return sum(counter.get_flop_counts()["Global"].values()) / 1e12


def flops_table() -> str:
    rate = SVD_ANCHOR[0] / SVD_ANCHOR[1]
    rows = []
    for name, (_, calls, published) in CONFIGS.items():
        per_call = call_tflop(name)
        total = per_call * calls
        rows.append([name, f"{per_call:.1f}", calls, f"{total / 1000:.1f}", f"{total / SVD_ANCHOR[0]:.1f}",
                     f"{total / rate:.0f} s", f"{total / rate / H100_OVER_A100:.0f} s", published])
    return ("Transformer FLOPs per video at each model's defaults (50 steps, guidance on), projected from SVD-XT's "
            f"anchor ({SVD_ANCHOR[0]:.0f} TFLOP in {SVD_ANCHOR[1]} s on an A100):\n\n"
            + table(["model", "TFLOP per call", "calls", "PFLOP per video", "vs SVD-XT", "projected A100",
                     "projected H100", "published"], rows)
            + "\n\nAttention is most of Wan's work at 720p (27,280 tokens for TI2V-5B, 75,600 for 2.1-14B) and runs "
              "far nearer a GPU's peak than SVD's convolutions: projected from SVD's efficiency, Wan 2.1 14B "
              "comes out slower than its authors measured; their 1491.6 s on an H100 is 654 PFLOP at about 44 % of "
              "the H100's dense BF16 peak. Real step times need a GPU machine; none was measured here.")


def measure(family: str, steps: int) -> list:
    from pipeline import VideoGenerator
    from video_diffusion.params import resolve_defaults

    module = FAMILIES[family]
    model = module.describe(module.TINY, None, None)
    generator = VideoGenerator(build_tiny_pipeline(family), model, "cpu", "float32")
    calls = [0]
    for block in blocks_of(generator.pipe.transformer)[1:]:
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
    print("### Work per video\n\n" + flops_table() + "\n\n### cache=fast on the tiny models\n")
    print("Tiny random-weight pipelines, 64x64, 9 frames, guidance on (Wan: two transformer passes per step; "
          "LTX-Video: one pass on a batch of two), CPU.\n\n"
          + table(["model", "steps", "tail-block passes, cache=off", "cache=fast", "fast / off",
                   "mean abs pixel difference", "time off / fast"], rows))


if __name__ == "__main__":
    main()
