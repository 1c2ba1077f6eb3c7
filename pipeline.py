"""Model choice, loading and generation: with the model-side modules it imports (`video_diffusion/models/`),
the only code that imports torch and diffusers.

torch and those modules are imported inside functions so that the API process of a Redis deployment, which holds
no model, never pays for them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from config import Settings
from video_diffusion.errors import OutOfMemory
from video_diffusion.models.contract import NOISE_NOTE, ModelInfo, Progress
from video_diffusion.params import DEFAULT_MAX_GUIDANCE

log = logging.getLogger(__name__)

REPOS = {
    "svd": ("stabilityai/stable-video-diffusion-img2vid", 14),
    "svd-xt": ("stabilityai/stable-video-diffusion-img2vid-xt", 25),
    "svd-xt-1-1": ("stabilityai/stable-video-diffusion-img2vid-xt-1-1", 25),
}
TINY = "tiny"
# A folder saved by save_tiny_pipeline carries this file, so the service knows its output is noise.
TINY_MARKER = "video_diffusion.json"
TINY_DEFAULTS = {"num_frames": 14, "num_inference_steps": 8, "width": 256, "height": 144,
                 "max_guidance_scale": DEFAULT_MAX_GUIDANCE}
SVD_DEFAULTS = {"num_frames": 25, "num_inference_steps": 25, "width": 1024, "height": 576,
                "max_guidance_scale": DEFAULT_MAX_GUIDANCE}
# AnimateLCM-SVD-xt (video_diffusion/models/animatelcm.py): SVD-XT's parts, its distilled UNet weights, and the consistency sampler.
ANIMATELCM = "animatelcm-svd-xt"
ANIMATELCM_WEIGHTS = ("wangfuyun/AnimateLCM-SVD-xt", "AnimateLCM-SVD-xt-1.1.safetensors")
# The authors' recommended sampling: 4 steps, guidance from 1 at the first frame to 1.2 at the last.
CONSISTENCY_DEFAULTS = {"num_inference_steps": 4, "max_guidance_scale": 1.2}
CONSISTENCY_SCHEDULER = "AnimateLCMScheduler"  # a folder whose scheduler is this samples as AnimateLCM does
ANIMATELCM_LEVELS = 40  # noise levels of the published AnimateLCM-SVD-xt sampler: the most steps it takes

def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def describe_model(settings: Settings, gpu: bool) -> ModelInfo:
    """What `SVD_MODEL` names, with its default frames, steps, size and guidance (`VIDEO_*` settings win). Reads
    no weights and imports no torch: the API process of a Redis deployment asks too."""
    name = settings.svd_model or ("svd-xt" if gpu else TINY)
    weights, levels = None, None
    if name == TINY:
        defaults, source, noise = dict(TINY_DEFAULTS), None, True
    elif name in REPOS:
        source, frames = REPOS[name]
        defaults, noise = dict(SVD_DEFAULTS, num_frames=frames), False
    elif name == ANIMATELCM:
        source, noise, weights = REPOS["svd-xt"][0], False, ANIMATELCM_WEIGHTS
        defaults, levels = dict(SVD_DEFAULTS), ANIMATELCM_LEVELS
    elif (Path(name) / TINY_MARKER).is_file():
        defaults = json.loads((Path(name) / TINY_MARKER).read_text())["defaults"]
        levels = _consistency_levels(Path(name))
        source, noise, name = name, True, TINY if levels is None else f"{TINY}-animatelcm"
    else:
        defaults, source, noise = dict(SVD_DEFAULTS), name, False
        if Path(name).is_dir():  # public answers name the folder, not where it is
            levels = _consistency_levels(Path(name))
            name = Path(name).name
    if levels is not None:
        defaults.update(CONSISTENCY_DEFAULTS, num_inference_steps=min(CONSISTENCY_DEFAULTS["num_inference_steps"],
                                                                      levels))
    for key, value in (("num_frames", settings.video_frames), ("width", settings.video_width),
                       ("height", settings.video_height)):
        if value is not None:
            defaults[key] = value
    return ModelInfo(name=name, source=source, noise=noise, defaults=defaults, max_steps=levels,
                     unet_weights=weights)


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


def build_tiny_pipeline():
    """A small random-weight StableVideoDiffusionPipeline from the real diffusers classes, same every time.

    Shaped like diffusers' own fast tests, with the real model's x8 VAE so that sizes mean what they do
    for SVD, and one attention head and layer per block so a 256x144 video takes seconds on a CPU.
    """
    import torch
    _quiet_processor_warning()
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
    return assemble(unet, vae, encoder)


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


def save_tiny_pipeline(path: str | os.PathLike, animatelcm: bool = False) -> None:
    """Save the tiny pipeline as a diffusers folder that `SVD_MODEL=<path>` serves; with `animatelcm`, it samples
    with AnimateLCM's consistency scheduler (the UNet stays random: the scheduler is what is exercised)."""
    pipe = build_tiny_pipeline()
    if animatelcm:
        from video_diffusion.models.animatelcm import AnimateLCMScheduler

        pipe.scheduler = AnimateLCMScheduler()
    pipe.save_pretrained(path)
    (Path(path) / TINY_MARKER).write_text(json.dumps({"tiny": True, "defaults": TINY_DEFAULTS}))


class VideoGenerator:
    """One loaded pipeline; generates one video at a time."""

    def __init__(self, pipe, model: ModelInfo, device: str, dtype: str, *, deep_cache=None,
                 compiled: bool = False, cache_interval: int = 1):
        self.pipe = pipe
        self.model = model
        self.device = device
        self.dtype = dtype
        self.deep_cache = deep_cache  # speedups.DeepCache on the UNet, reset for every call
        self.compiled = compiled
        self.needs_warm_up = compiled  # backends call warm_up() before taking work
        self.default_cache_interval = cache_interval
        self._shapes_seen: set[tuple] = set()
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """One generation at the default size, so that compiling happens now, not on a user's request. Enough
        steps for both kinds of step (full, and with the deep blocks reused) to be compiled."""
        from PIL import Image

        from video_diffusion.params import PARAMS, resolve_defaults

        params = resolve_defaults({p.name: p.default for p in PARAMS}, self.model.defaults)
        params.update(seed=0, cache_interval=self.default_cache_interval,
                      num_inference_steps=max(2, self.default_cache_interval + 1))
        image = Image.new("RGB", (params["width"], params["height"]), (128, 128, 128))
        started = time.perf_counter()
        self.generate(image, params, lambda *_: None)
        log.info("warm-up done in %.1f s at %dx%d, %d frames", time.perf_counter() - started, params["width"],
                 params["height"], params["num_frames"])

    def generate(self, image, params: dict[str, Any], progress: Progress) -> np.ndarray:
        """Frames (N x H x W x 3 uint8) for `image`, already sized to params' width x height."""
        import torch

        total = params["num_inference_steps"]

        def on_step_end(pipe, step, timestep, tensors):
            # The VAE decodes right after the last step, so that is where "decoding" starts.
            progress("decoding" if step + 1 == total else "denoising", step + 1, total)
            return tensors

        with self._lock:
            progress("denoising", 0, total)
            if self.deep_cache is not None:
                self.deep_cache.reset(params.get("cache_interval", 1))
            shape = (image.width, image.height, params["num_frames"], params.get("cache_interval", 1))
            generator = torch.Generator("cpu").manual_seed(params["seed"])
            if hasattr(self.pipe.scheduler, "generator"):  # a sampler that draws noise at every step draws it here
                self.pipe.scheduler.generator = generator
            if self.compiled and shape not in self._shapes_seen:
                log.info("compiling for a new shape: %dx%d, %d frames, cache_interval %d (the first such request "
                         "pays for it)", *shape)
                self._shapes_seen.add(shape)
            try:
                with torch.inference_mode():
                    frames = self.pipe(
                        image, width=image.width, height=image.height, num_frames=params["num_frames"],
                        num_inference_steps=total, fps=params["fps"], motion_bucket_id=params["motion_bucket_id"],
                        noise_aug_strength=params["noise_aug_strength"],
                        decode_chunk_size=params["decode_chunk_size"],
                        min_guidance_scale=params["min_guidance_scale"],
                        max_guidance_scale=params["max_guidance_scale"],
                        generator=generator,
                        output_type="np", callback_on_step_end=on_step_end).frames[0]
            except torch.OutOfMemoryError:
                raise OutOfMemory(f"the {self.device} ran out of memory; try fewer frames, a smaller size or a "
                                  "lower decode_chunk_size") from None
            finally:
                if hasattr(self.pipe.scheduler, "generator"):
                    self.pipe.scheduler.generator = None
                if self.device == "cuda":
                    torch.cuda.empty_cache()
        return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)

    def describe(self) -> dict[str, Any]:
        """What /health and a worker's heartbeat say about the loaded model."""
        return {"model": self.model.label, "noise": self.model.noise, "device": self.device, "dtype": self.dtype}

    def memory_stats(self) -> dict[str, int]:
        """CUDA memory allocated, reserved and peak, in bytes, named as their gauges (empty off CUDA)."""
        import torch

        if self.device != "cuda":
            return {}
        return {"gpu_memory_allocated_bytes": torch.cuda.memory_allocated(),
                "gpu_memory_reserved_bytes": torch.cuda.memory_reserved(),
                "gpu_memory_peak_bytes": torch.cuda.max_memory_allocated()}


CPU_NOTE = ("this machine has no GPU: a real model would take many minutes per video here (SVD_MODEL=tiny tries "
            "the service in seconds)")


class LoadSettingError(RuntimeError):
    """The settings ask for something this machine cannot do; the message is safe to show to clients."""


def describe_load_failure(exc: BaseException) -> str:
    """What failed and what to do, in one sentence for `/health` and 503s: no paths, hosts or exception text."""
    described = _describe(exc)
    return f"{described}; {CPU_NOTE}" if CPU_NOTE in getattr(exc, "__notes__", ()) else described


def _describe(exc: BaseException) -> str:
    import torch
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    text = str(exc)
    if isinstance(exc, LoadSettingError):
        return text
    if isinstance(exc, GatedRepoError):
        return ("the model is gated on Hugging Face: accept its licence there and set HF_TOKEN, or set SVD_MODEL "
                "to a local folder")
    if isinstance(exc, RepositoryNotFoundError) or "neither a valid local path nor a valid repo id" in text:
        return ("SVD_MODEL names neither a model folder on this machine nor a model repository: use svd, svd-xt, "
                "svd-xt-1-1, a Hugging Face repo id or a folder saved in diffusers layout")
    if isinstance(exc, OSError) and any(s in text for s in ("not fully cached", "connect", "offline", "resolve")):
        return ("the model could not be downloaded: no access to the model hub; check the network, set HF_TOKEN "
                "for gated models, or set SVD_MODEL to a local folder")
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "not enough memory to load the model: try SVD_OFFLOAD=model, SVD_DTYPE=float16 or a smaller model"
    return "the model could not be loaded; the server log has the details"


def _pick_device(requested: str) -> str:
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return next(name for name, ok in available.items() if ok)
    if not available[requested]:
        raise LoadSettingError(f"SVD_DEVICE={requested}, but no {requested} device is available")
    return requested


def load_generator(settings: Settings) -> VideoGenerator:
    """Load the pipeline `SVD_MODEL` names onto its device, with the memory and speed options set."""
    if settings.cuda_visible_devices is not None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", settings.cuda_visible_devices)
    import torch
    _quiet_processor_warning()
    from diffusers import StableVideoDiffusionPipeline

    # A folder may name our scheduler's module; diffusers loads only modules already imported. Folders saved before
    # the modules moved into video_diffusion/ name it `animatelcm`.
    from video_diffusion.models import animatelcm
    sys.modules.setdefault("animatelcm", animatelcm)

    device = _pick_device(settings.svd_device)
    model = describe_model(settings, gpu=device != "cpu")
    dtype_name = settings.svd_dtype if settings.svd_dtype != "auto" else ("float16" if device == "cuda"
                                                                          else "float32")
    dtype = getattr(torch, dtype_name)
    if model.source is None:
        pipe = build_tiny_pipeline()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        if device == "cpu" and not model.noise:
            log.warning("SVD_MODEL=%s on a CPU: %s", model.name, CPU_NOTE)
        try:
            pipe = _from_pretrained(StableVideoDiffusionPipeline, model.source, dtype, dtype_name == "float16",
                                    **_animatelcm_parts(model))
            if model.unet_weights is not None:
                from video_diffusion.models.animatelcm import load_unet_weights

                load_unet_weights(pipe.unet, *model.unet_weights)
        except Exception as exc:
            if device == "cpu" and not model.noise:
                exc.add_note(CPU_NOTE)
            raise
    if model.noise:
        log.warning("serving %s: %s. Set SVD_MODEL=svd-xt (or svd) on a GPU machine for real videos.",
                    model.name, NOISE_NOTE)
    pipe.set_progress_bar_config(disable=True)
    if settings.svd_offload != "none":
        if device != "cuda":
            raise LoadSettingError(f"SVD_OFFLOAD={settings.svd_offload} needs a CUDA device; this one is {device}")
        if settings.svd_offload == "model":
            pipe.enable_model_cpu_offload()
        else:
            pipe.enable_sequential_cpu_offload()
    else:
        pipe.to(device)
    if settings.svd_forward_chunking:
        pipe.unet.enable_forward_chunking()
    from video_diffusion.models.speedups import DeepCache, install_cross_attention

    install_cross_attention(pipe.unet)
    if settings.svd_compile:
        compile_blocks(pipe.unet)
    deep_cache = DeepCache(pipe.unet)  # after compiling: its bookkeeping stays outside the compiled graphs
    return VideoGenerator(pipe, model, device, dtype_name, deep_cache=deep_cache, compiled=settings.svd_compile,
                          cache_interval=settings.svd_cache_interval)


COMPILE_BACKEND = "inductor"  # tests use "eager": the same tracing, without minutes of code generation on a CPU


def compile_blocks(unet) -> None:
    """torch.compile each down, mid and up block of the UNet. Not the UNet as one graph: the deep-feature reuse
    decides in Python, between blocks, which ones run. No CUDA graphs ("reduce-overhead"): their outputs are
    overwritten by the next replay, and the reuse keeps one block's output across steps."""
    import torch

    torch._logging.set_logs(recompiles=True)  # a new shape compiles again: say so in the log
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        block.forward = torch.compile(block.forward, backend=COMPILE_BACKEND)


def _drop_torchvision_notice(record: logging.LogRecord) -> bool:
    return "requires torchvision" not in record.getMessage()


def _quiet_processor_warning() -> None:
    """diffusers' SVD module imports `CLIPImageProcessor` by name, and transformers then warns that it needs
    torchvision and falls back to the Pillow processor. Pillow is the backend we choose (`assemble`; the
    pipeline resizes with Pillow anyway), so that warning, which reads like a missing dependency, says nothing true
    here: drop exactly it, before diffusers is imported. One filter however often this runs (the logger keeps a
    filter once)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_notice)


def _animatelcm_parts(model: ModelInfo) -> dict[str, Any]:
    """from_pretrained's overrides for AnimateLCM-SVD-xt: its sampler instead of the source's Euler scheduler."""
    if model.unet_weights is None:
        return {}
    from video_diffusion.models.animatelcm import AnimateLCMScheduler

    return {"scheduler": AnimateLCMScheduler()}


def _from_pretrained(cls, source: str, dtype, want_fp16_variant: bool, **parts):
    if want_fp16_variant:
        try:
            return cls.from_pretrained(source, dtype=dtype, variant="fp16", **parts)
        except (OSError, ValueError) as exc:
            # Folders and repos without fp16 files: load the full-precision files and cast them.
            log.info("no fp16 variant of %s (%s); loading the default weights as float16", source, exc)
    return cls.from_pretrained(source, dtype=dtype, **parts)
