"""Stable Video Diffusion (SVD, SVD-XT, AnimateLCM-SVD-xt): names, defaults, the tiny build and the pipeline call.

Constants and descriptions import no torch (the API of a Redis deployment reads them); building, preparing and
calling import it inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from video_diffusion.models.contract import ModelInfo
from video_diffusion.params import DEFAULT_MAX_GUIDANCE

FAMILY = "svd"
PIPELINE = "StableVideoDiffusionPipeline"  # what every SVD model loads as
CLASS_NAMES = ("StableVideoDiffusionPipeline",)  # a folder's model_index.json `_class_name`
REPOS = {
    "svd": ("stabilityai/stable-video-diffusion-img2vid", 14),
    "svd-xt": ("stabilityai/stable-video-diffusion-img2vid-xt", 25),
    "svd-xt-1-1": ("stabilityai/stable-video-diffusion-img2vid-xt-1-1", 25),
}
TINY = "tiny"
TINY_DEFAULTS = {"num_frames": 14, "num_inference_steps": 8, "width": 256, "height": 144, "fps": 6,
                 "max_guidance_scale": DEFAULT_MAX_GUIDANCE}
SVD_DEFAULTS = {"num_frames": 25, "num_inference_steps": 25, "width": 1024, "height": 576, "fps": 6,
                "max_guidance_scale": DEFAULT_MAX_GUIDANCE}
FRAMES = (14, 30, 1)
# AnimateLCM-SVD-xt (animatelcm.py): SVD-XT's parts, its distilled UNet weights, and the consistency sampler.
ANIMATELCM = "animatelcm-svd-xt"
ANIMATELCM_WEIGHTS = ("wangfuyun/AnimateLCM-SVD-xt", "AnimateLCM-SVD-xt-1.1.safetensors")
# The authors' recommended sampling: 4 steps, guidance from 1 at the first frame to 1.2 at the last.
CONSISTENCY_DEFAULTS = {"num_inference_steps": 4, "max_guidance_scale": 1.2}
CONSISTENCY_SCHEDULER = "AnimateLCMScheduler"  # a folder whose scheduler is this samples as AnimateLCM does
ANIMATELCM_LEVELS = 40  # noise levels of the published AnimateLCM-SVD-xt sampler: the most steps it takes
NAMES = (*REPOS, ANIMATELCM, TINY)


def describe(name: str, folder: Path | None, tiny_defaults: dict | None) -> ModelInfo:
    """A named SVD model, or a folder (`tiny_defaults` when our tiny build saved it)."""
    weights, levels = None, None
    if name == TINY:
        defaults, source, noise = dict(TINY_DEFAULTS), None, True
    elif name in REPOS:
        source, frames = REPOS[name]
        defaults, noise = dict(SVD_DEFAULTS, num_frames=frames), False
    elif name == ANIMATELCM:
        source, noise, weights = REPOS["svd-xt"][0], False, ANIMATELCM_WEIGHTS
        defaults, levels = dict(SVD_DEFAULTS), ANIMATELCM_LEVELS
    elif tiny_defaults is not None:
        levels = _consistency_levels(folder)
        defaults, source, noise = {"fps": 6, **tiny_defaults}, str(folder), True
        name = TINY if levels is None else f"{TINY}-animatelcm"
    else:
        defaults, source, noise = dict(SVD_DEFAULTS), name, False
        if folder is not None:  # public answers name the folder, not where it is
            levels, name = _consistency_levels(folder), folder.name
    if levels is not None:
        defaults.update(CONSISTENCY_DEFAULTS, num_inference_steps=min(CONSISTENCY_DEFAULTS["num_inference_steps"],
                                                                      levels))
    return ModelInfo(name=name, source=source, noise=noise, defaults=defaults, max_steps=levels,
                     unet_weights=weights, family=FAMILY, frames=FRAMES, size_multiple=8)


def _consistency_levels(folder: Path) -> int | None:
    """How many noise levels the AnimateLCM scheduler a model folder names steps through (the most steps a request
    may ask for); None when its scheduler is another one, or the folder names none."""
    try:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("_class_name") != CONSISTENCY_SCHEDULER:
        return None
    return int(config.get("num_train_timesteps", ANIMATELCM_LEVELS))


def build_tiny(animatelcm: bool = False):
    """A small random-weight StableVideoDiffusionPipeline from the real diffusers classes, same every time.

    Shaped like diffusers' own fast tests, with the real model's x8 VAE so that sizes mean what they do
    for SVD, and one attention head and layer per block so a 256x144 video takes seconds on a CPU. With
    `animatelcm`, it samples with AnimateLCM's consistency scheduler (the UNet stays random).
    """
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetSpatioTemporalConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=32, num_attention_heads=1, projection_class_embeddings_input_dim=96,
            addition_time_embed_dim=32)
        vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 32, 64, 64], in_channels=3, out_channels=3,
                                           down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=4)
        # The pipeline resizes the image to 224x224 for CLIP, so the encoder must take 224.
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=5, num_attention_heads=4, image_size=224,
            intermediate_size=37, patch_size=32))
    pipe = assemble(unet, vae, encoder)
    if animatelcm:
        from video_diffusion.models.animatelcm import AnimateLCMScheduler

        pipe.scheduler = AnimateLCMScheduler()
    return pipe


def assemble(unet, vae, encoder):
    """A StableVideoDiffusionPipeline around these models, with SVD's own scheduler and image processor.

    CLIP's image processor on Pillow, chosen explicitly: the pipeline resizes with Pillow anyway, and left to itself
    transformers looks for torchvision and prints a warning that reads like a missing dependency."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessorPil

    scheduler = EulerDiscreteScheduler(  # SVD-XT's published scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessorPil(crop_size=224, size=224))
    for module in (unet, vae, encoder):
        module.eval()  # built from configs they start in train mode; from_pretrained gives eval mode
    return pipe


def loading_parts(model: ModelInfo) -> dict[str, Any]:
    """from_pretrained's overrides: AnimateLCM-SVD-xt's sampler instead of the source's Euler scheduler."""
    if model.unet_weights is None:
        return {}
    from video_diffusion.models.animatelcm import AnimateLCMScheduler

    return {"scheduler": AnimateLCMScheduler()}


def after_loading(pipe, model: ModelInfo) -> None:
    if model.unet_weights is not None:
        from video_diffusion.models.animatelcm import load_unet_weights

        load_unet_weights(pipe.unet, *model.unet_weights)


def denoiser(pipe):
    """The network that runs once (or twice, with guidance) per step."""
    return pipe.unet


def call_arguments(image, params: dict[str, Any]) -> dict[str, Any]:
    return {"image": image, "width": image.width, "height": image.height, "num_frames": params["num_frames"],
            "num_inference_steps": params["num_inference_steps"], "fps": params["fps"],
            "motion_bucket_id": params["motion_bucket_id"], "noise_aug_strength": params["noise_aug_strength"],
            "decode_chunk_size": params["decode_chunk_size"], "min_guidance_scale": params["min_guidance_scale"],
            "max_guidance_scale": params["max_guidance_scale"]}
