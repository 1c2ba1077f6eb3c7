"""Wan 2.1 and 2.2 image-to-video (Wan-AI): names, published defaults, the tiny builds and the pipeline call.

Two layouts load as `WanImageToVideoPipeline`: Wan 2.2 TI2V-5B (no image encoder, `expand_timesteps`, a x16 VAE
with 2x2 patches: sizes in 32s) and Wan 2.1 I2V-14B (a CLIP image encoder, a x8 VAE: sizes in 16s). Frames are
4k+1 (the VAE packs 4 frames into one latent after the first). The prompt is cleaned with ftfy by the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from video_diffusion.models.contract import ModelInfo
from video_diffusion.models.prompted import call_arguments, denoiser  # noqa: F401 - members of the family

FAMILY = "wan"
PIPELINE = "WanImageToVideoPipeline"
CLASS_NAMES = ("WanPipeline", "WanImageToVideoPipeline")
# name: (repo, defaults, num_frames range, size multiple). Defaults from the model cards and Wan's repositories.
NAMED = {
    "wan2.2-ti2v-5b": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                       {"width": 1280, "height": 704, "num_frames": 121, "fps": 24, "num_inference_steps": 50,
                        "guidance_scale": 5.0}, (5, 121, 4), 32),
    "wan2.1-i2v-14b-480p": ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                            {"width": 832, "height": 480, "num_frames": 81, "fps": 16, "num_inference_steps": 50,
                             "guidance_scale": 5.0}, (5, 81, 4), 16),
    "wan2.1-i2v-14b-720p": ("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
                            {"width": 1280, "height": 720, "num_frames": 81, "fps": 16, "num_inference_steps": 50,
                             "guidance_scale": 5.0}, (5, 81, 4), 16),
}
TINY = "tiny-wan"
TINY_DEFAULTS = {"width": 64, "height": 64, "num_frames": 9, "fps": 16, "num_inference_steps": 2,
                 "guidance_scale": 5.0}
FOLDER_DEFAULTS = NAMED["wan2.2-ti2v-5b"][1]  # a folder of unknown size class: the 5B model's card
NAMES = (*NAMED, TINY)


def describe(name: str, folder: Path | None, tiny_defaults: dict | None) -> ModelInfo:
    if name in NAMED:
        repo, defaults, frames, multiple = NAMED[name]
        return ModelInfo(name=name, source=repo, noise=False, defaults=dict(defaults), family=FAMILY,
                         frames=frames, size_multiple=multiple)
    if name == TINY:
        return ModelInfo(name=TINY, source=None, noise=True, defaults=dict(TINY_DEFAULTS), family=FAMILY,
                         frames=(5, 33, 4), size_multiple=32)
    spatial, temporal = _folder_factors(folder) if folder is not None else (32, 4)
    if tiny_defaults is not None:
        return ModelInfo(name=TINY, source=str(folder), noise=True, defaults=dict(tiny_defaults), family=FAMILY,
                         frames=(temporal + 1, 8 * temporal + 1, temporal), size_multiple=spatial)
    return ModelInfo(name=folder.name if folder is not None else name, source=str(folder or name), noise=False,
                     defaults=dict(FOLDER_DEFAULTS), family=FAMILY, frames=(temporal + 1, 121, temporal),
                     size_multiple=spatial)


def _folder_factors(folder: Path) -> tuple[int, int]:
    """Sizes and frame steps a Wan folder needs, from its configs: VAE scale x transformer patch; VAE time scale."""
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        return (int(vae.get("scale_factor_spatial", 8)) * int(transformer.get("patch_size", [1, 2, 2])[1]),
                int(vae.get("scale_factor_temporal", 4)))
    except (OSError, ValueError, TypeError, IndexError):
        return 32, 4  # a repo id: its configs come with the weights; the larger multiple fits both layouts


def build_tiny(layout: str = "ti2v"):
    """A small random-weight WanImageToVideoPipeline from the real diffusers classes, same every time: Wan 2.2
    TI2V's layout (no image encoder, expand_timesteps) by default, Wan 2.1 I2V's (a CLIP image encoder) with
    layout="i2v". Text encoder and tokenizer are built offline (a T5 vocabulary with no files)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = T5Tokenizer()
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8,
                                                   num_heads=4, num_layers=2, relative_attention_num_buckets=8))
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
        if layout == "ti2v":
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
                text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
            vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, dim_mult=[1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                                   patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
            parts = {"image_encoder": None, "image_processor": None, "expand_timesteps": True}
        else:
            from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
                text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=4)
            vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True])
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                intermediate_size=16, patch_size=1))
            encoder.eval()
            parts = {"image_encoder": encoder, "image_processor": CLIPImageProcessorPil(crop_size=32, size=32)}
    for module in (text_encoder, transformer, vae):
        module.eval()  # built from configs they start in train mode; from_pretrained gives eval mode
    return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   transformer=transformer, **parts)


def loading_parts(model: ModelInfo) -> dict[str, Any]:
    """The VAE in float32, as Wan's authors and diffusers' example load it (the rest in the pipeline's dtype)."""
    import torch
    from diffusers import AutoencoderKLWan

    return {"vae": AutoencoderKLWan.from_pretrained(model.source, subfolder="vae", torch_dtype=torch.float32)}

