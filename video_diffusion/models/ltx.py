"""LTX-Video (Lightricks): names, published defaults, the tiny build and the pipeline call.

`Lightricks/LTX-Video`'s diffusers files sit at the repository's top level and its model_index names the
text-to-video `LTXPipeline`; the service loads every LTX folder as `LTXImageToVideoPipeline`. Sizes are multiples
of 32 (the VAE's x32), frames 8k+1 (x8 in time after the first frame). The frame rate conditions the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from video_diffusion.models import prompted
from video_diffusion.models.contract import ModelInfo
from video_diffusion.models.prompted import denoiser  # noqa: F401 - a member of the family

FAMILY = "ltx"
PIPELINE = "LTXImageToVideoPipeline"
CLASS_NAMES = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")
# The model card's image-to-video example: 704x480, 161 frames, 50 steps, played at 24 fps; guidance 3.
DEFAULTS = {"width": 704, "height": 480, "num_frames": 161, "fps": 24, "num_inference_steps": 50,
            "guidance_scale": 3.0}
NAMED = {"ltx-video": ("Lightricks/LTX-Video", DEFAULTS)}
TINY = "tiny-ltx"
TINY_DEFAULTS = {"width": 64, "height": 64, "num_frames": 9, "fps": 24, "num_inference_steps": 2,
                 "guidance_scale": 3.0}
NAMES = (*NAMED, TINY)


def describe(name: str, folder: Path | None, tiny_defaults: dict | None) -> ModelInfo:
    if name in NAMED:
        repo, defaults = NAMED[name]
        return ModelInfo(name=name, source=repo, noise=False, defaults=dict(defaults), family=FAMILY,
                         frames=(9, 257, 8), size_multiple=32)
    if name == TINY:
        return ModelInfo(name=TINY, source=None, noise=True, defaults=dict(TINY_DEFAULTS), family=FAMILY,
                         frames=(5, 33, 4), size_multiple=32)
    temporal = _temporal_factor(folder) if folder is not None else 8
    if tiny_defaults is not None:
        return ModelInfo(name=TINY, source=str(folder), noise=True, defaults=dict(tiny_defaults), family=FAMILY,
                         frames=(temporal + 1, 8 * temporal + 1, temporal), size_multiple=32)
    return ModelInfo(name=folder.name if folder is not None else name, source=str(folder or name), noise=False,
                     defaults=dict(DEFAULTS), family=FAMILY, frames=(temporal + 1, 257, temporal), size_multiple=32)


def _temporal_factor(folder: Path) -> int:
    """Frames the VAE packs into one latent after the first, from its config (patch_size_t x 2 per time scaling)."""
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(vae.get("patch_size_t", 1)) * 2 ** sum(bool(s) for s in vae.get("spatio_temporal_scaling", []))
    except (OSError, ValueError, TypeError):
        return 8


def build_tiny():
    """A small random-weight LTX pipeline from the real diffusers classes, same every time, saved as the
    text-to-video `LTXPipeline` as the published repository is (the service loads it as image-to-video)."""
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = T5Tokenizer()
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                               num_layers=2, relative_attention_num_buckets=8))
        transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                 num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                                 num_layers=2, caption_channels=32)  # two: a block cache needs them
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
            patch_size_t=1, encoder_causal=True, decoder_causal=False)
    for module in (text_encoder, transformer, vae):
        module.eval()
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)


def call_arguments(image, params: dict[str, Any]) -> dict[str, Any]:
    return {**prompted.call_arguments(image, params), "frame_rate": params["fps"]}  # the rate conditions LTX
