"""Model choice, loading and generation: with the model-side modules it imports (`video_diffusion/models/`),
the only code that imports torch and diffusers.

Which family a model belongs to (SVD, Wan, LTX-Video) decides its pipeline class, parameters, defaults and rules
(`video_diffusion/models/families.py`); the rest of the service does not know which one it runs. torch and the
family modules' model code are imported inside functions, so that the API process of a Redis deployment, which
holds no model, never pays for them.
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
from video_diffusion.models import svd
from video_diffusion.models.contract import NOISE_NOTE, ModelInfo, Progress
from video_diffusion.models.families import (FAMILIES, TINY_MARKER, UnknownFamily, family_named, family_of_folder,
                                             tiny_defaults)

log = logging.getLogger(__name__)

# The SVD family's names, as earlier releases had them here (tests and benchmarks patch REPOS).
REPOS, TINY, ANIMATELCM = svd.REPOS, svd.TINY, svd.ANIMATELCM
# `cache` presets: diffusers' First Block Cache thresholds (relative change of the first block's output).
CACHE_THRESHOLDS = {"fast": 0.1}
# dtype `auto` on CUDA, per family: SVD ships fp16 weights; Wan and LTX-Video are trained and published in bf16.
CUDA_DTYPES = {"svd": "float16", "wan": "bfloat16", "ltx": "bfloat16"}
SVD_XT = svd.describe("svd-xt", None, None)  # what an API that knows no model yet checks requests against


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def describe_model(settings: Settings, gpu: bool) -> ModelInfo:
    """What `MODEL` (or `SVD_MODEL`) names, with its defaults and limits (`VIDEO_*` settings win, checked against
    the model's rules). Reads no weights and imports no torch: the API process of a Redis deployment asks too."""
    name = settings.svd_model or ("svd-xt" if gpu else TINY)
    folder = Path(name) if Path(name).is_dir() else None
    family = family_named(name) or (family_of_folder(folder) if folder is not None else _family_of_repo(name))
    model = family.describe(name, folder, tiny_defaults(folder) if folder is not None else None)
    for key, variable in (("num_frames", "VIDEO_FRAMES"), ("width", "VIDEO_WIDTH"), ("height", "VIDEO_HEIGHT")):
        value = getattr(settings, variable.lower())
        if value is not None:
            _check_against_model(variable, value, model)
            model.defaults[key] = value
    return model


def _family_of_repo(repo: str):
    """A repo id's family from its model_index.json if the Hugging Face cache has it; else SVD (as before)."""
    cached = _cached_index(repo)
    return family_of_folder(cached.parent) if cached is not None else svd


def _cached_index(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "model_index.json")
    except Exception:  # noqa: BLE001 - not a repo id the hub library accepts: SVD's loader says what is wrong
        return None
    return Path(cached) if isinstance(cached, str) else None


def knows_family(name: str) -> bool:
    """Whether this process can tell the family of `name` without loading it: a name the service serves, a folder
    it can read, or a repo id whose model_index.json is in the Hugging Face cache. The API of a Redis deployment
    asks: a folder that only the workers' machines hold is known from their heartbeats, never guessed."""
    return family_named(name) is not None or Path(name).is_dir() or _cached_index(name) is not None


def _check_against_model(variable: str, value: int, model: ModelInfo) -> None:
    least, most, step = model.frames
    if variable == "VIDEO_FRAMES" and not (least <= value <= most and (value - 1) % step == 0):
        rule = f", {step}k+1" if step > 1 else ""
        raise LoadSettingError(f"VIDEO_FRAMES={value} does not fit {model.name}: it takes {least} to {most} "
                               f"frames{rule}")
    if variable != "VIDEO_FRAMES" and value % model.size_multiple:
        raise LoadSettingError(f"{variable}={value} does not fit {model.name}: sizes must be multiples of "
                               f"{model.size_multiple}")


def build_tiny_pipeline(family: str = "svd", **options):
    """The tiny random-weight pipeline of a family (built from the real diffusers classes), as it serves."""
    import diffusers

    _quiet_processor_warning()
    module = FAMILIES[family]
    pipe = module.build_tiny(**options)
    serving = getattr(diffusers, module.PIPELINE)
    return pipe if isinstance(pipe, serving) else serving(**pipe.components)


def save_tiny_pipeline(path: str | os.PathLike, animatelcm: bool = False, family: str = "svd",
                       **options) -> None:
    """Save a family's tiny pipeline as a diffusers folder that `MODEL=<path>` serves; with `animatelcm` (SVD), it
    samples with AnimateLCM's consistency scheduler (the UNet stays random: the scheduler is what is exercised)."""
    module = FAMILIES[family]
    _quiet_processor_warning()
    pipe = module.build_tiny(animatelcm=animatelcm) if animatelcm else module.build_tiny(**options)
    pipe.save_pretrained(path)
    (Path(path) / TINY_MARKER).write_text(json.dumps({"tiny": True, "family": family,
                                                      "defaults": module.TINY_DEFAULTS}))


class VideoGenerator:
    """One loaded pipeline of any family; generates one video at a time."""

    def __init__(self, pipe, model: ModelInfo, device: str, dtype: str, *, deep_cache=None,
                 compiled: bool = False, cache_interval: int = 1):
        self.pipe = pipe
        self.model = model
        self.family = FAMILIES[model.family]
        self.device = device
        self.dtype = dtype
        self.deep_cache = deep_cache  # speedups.DeepCache on SVD's UNet, reset for every call
        self.compiled = compiled
        self.needs_warm_up = compiled  # backends call warm_up() before taking work
        self.default_cache_interval = cache_interval
        self._shapes_seen: set[tuple] = set()
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """One generation at the default size, so that compiling happens now, not on a user's request. Enough
        steps for both kinds of step (full, and with the deep blocks reused) to be compiled."""
        from PIL import Image

        from video_diffusion.params import resolve_defaults

        params = resolve_defaults({}, self.model.defaults, self.model.family)
        params.update(seed=0, num_inference_steps=max(2, self.default_cache_interval + 1))
        if "cache_interval" in params:
            params["cache_interval"] = self.default_cache_interval
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
            cached = self._cache_on(params.get("cache", "off"))
            try:
                with torch.inference_mode():
                    frames = self.pipe(**self.family.call_arguments(image, params), generator=generator,
                                       output_type="np", callback_on_step_end=on_step_end).frames[0]
            except torch.OutOfMemoryError:
                raise OutOfMemory(f"the {self.device} ran out of memory; try fewer frames, a smaller size or a "
                                  "lower decode_chunk_size") from None
            finally:
                if cached:  # off again after every call: the next one starts with no cached state
                    self.family.denoiser(self.pipe).disable_cache()
                if hasattr(self.pipe.scheduler, "generator"):
                    self.pipe.scheduler.generator = None
                if self.device == "cuda":
                    torch.cuda.empty_cache()
        return _to_uint8(np.asarray(frames))

    def _cache_on(self, preset: str) -> bool:
        """Turn the block cache on for one call, freshly built (so no state crosses calls); False when off."""
        if preset == "off":
            return False
        from diffusers import FirstBlockCacheConfig

        denoiser = self.family.denoiser(self.pipe)
        if len(blocks_of(denoiser)) < 2:  # the cache treats the first block and the last one apart
            log.warning("cache=%s: %s has a single transformer block; computing every step", preset, self.model.name)
            return False
        denoiser.enable_cache(FirstBlockCacheConfig(threshold=CACHE_THRESHOLDS[preset]))
        return True

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


def _to_uint8(frames: np.ndarray, chunk: int = 8) -> np.ndarray:
    """The pipeline's float frames in [0, 1] as uint8, a few frames at a time (no whole-clip float temporaries)."""
    out = np.empty(frames.shape, np.uint8)
    for start in range(0, len(frames), chunk):
        out[start:start + chunk] = np.round(np.clip(frames[start:start + chunk], 0.0, 1.0) * 255)
    return out


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
    if isinstance(exc, (LoadSettingError, UnknownFamily)):
        return text
    if isinstance(exc, GatedRepoError):
        return ("the model is gated on Hugging Face: accept its licence there and set HF_TOKEN, or set SVD_MODEL "
                "to a local folder")
    if isinstance(exc, RepositoryNotFoundError) or "neither a valid local path nor a valid repo id" in text:
        return ("MODEL/SVD_MODEL names neither a model folder on this machine nor a model repository: use svd, "
                "svd-xt, svd-xt-1-1, animatelcm-svd-xt, wan2.2-ti2v-5b, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p, "
                "ltx-video, a Hugging Face repo id or a folder saved in diffusers layout")
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
    """Load the pipeline `MODEL` names onto its device, with the family's class and the memory and speed options."""
    if settings.cuda_visible_devices is not None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", settings.cuda_visible_devices)
    elif os.environ.get("CUDA_VISIBLE_DEVICES") == "":  # CUDA reads it as "no GPU"; an empty setting means unset
        log.warning("CUDA_VISIBLE_DEVICES is set but empty: treating it as unset (every GPU visible)")
        del os.environ["CUDA_VISIBLE_DEVICES"]
    import diffusers
    import torch
    _quiet_processor_warning()

    # A folder may name our scheduler's module; diffusers loads only modules already imported. Folders saved before
    # the modules moved into video_diffusion/ name it `animatelcm`.
    from video_diffusion.models import animatelcm
    sys.modules.setdefault("animatelcm", animatelcm)

    device = _pick_device(settings.svd_device)
    model = _described_for_loading(settings, gpu=device != "cpu")
    family = FAMILIES[model.family]
    dtype_name = settings.svd_dtype if settings.svd_dtype != "auto" else (CUDA_DTYPES[model.family]
                                                                          if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if model.source is None:
        pipe = build_tiny_pipeline(model.family)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        if device == "cpu" and not model.noise:
            log.warning("MODEL=%s on a CPU: %s", model.name, CPU_NOTE)
        try:
            parts = family.loading_parts(model) if hasattr(family, "loading_parts") else {}
            pipe = _from_pretrained(getattr(diffusers, family.PIPELINE), model.source, dtype,
                                    dtype_name == "float16", **parts)
            if hasattr(family, "after_loading"):
                family.after_loading(pipe, model)
        except Exception as exc:
            if device == "cpu" and not model.noise:
                exc.add_note(CPU_NOTE)
            raise
    if model.noise:
        log.warning("serving %s: %s. Set MODEL=svd-xt, wan2.2-ti2v-5b or ltx-video on a GPU machine for real videos.",
                    model.name, NOISE_NOTE)
    return prepare_generator(pipe, model, settings, device, dtype_name)


def prepare_generator(pipe, model: ModelInfo, settings: Settings, device: str, dtype_name: str) -> VideoGenerator:
    """A loaded pipeline made ready to serve: VAE tiling, placement or offload, the speed options. Called by
    load_generator, and by bench/gpu_stages.py on an architecture built with random weights."""
    pipe.set_progress_bar_config(disable=True)
    if settings.vae_tiling:
        if model.family == "svd":
            raise LoadSettingError("VAE_TILING applies to Wan and LTX-Video; SVD decodes in chunks of frames: lower "
                                   "decode_chunk_size instead")
        pipe.vae.enable_tiling()
    _place(pipe, settings.svd_offload, device)
    return _with_speedups(pipe, model, settings, device, dtype_name)


def _described_for_loading(settings: Settings, gpu: bool) -> ModelInfo:
    """describe_model, after fetching a repo id's model_index.json (so its family is known; a named model's is)."""
    name = settings.svd_model or ""
    if name and family_named(name) is None and not Path(name).is_dir() and "/" in name:
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(name, "model_index.json")
        except Exception:  # noqa: BLE001 - loading the weights says what is wrong, in the words the user needs
            log.info("could not fetch %s's model_index.json; loading it as an SVD model", name)
    return describe_model(settings, gpu)


def _place(pipe, offload: str, device: str) -> None:
    if offload == "none":
        pipe.to(device)
        return
    if device != "cuda":
        raise LoadSettingError(f"SVD_OFFLOAD={offload} needs a CUDA device; this one is {device}")
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "group":  # every model of the pipeline, a block at a time
        import torch

        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1)
    else:
        pipe.enable_sequential_cpu_offload()


def _with_speedups(pipe, model: ModelInfo, settings: Settings, device: str, dtype_name: str) -> VideoGenerator:
    """SVD: chunked feed-forward, one-token cross-attention, deep-feature reuse; every family: SVD_COMPILE."""
    deep_cache = None
    if model.family == "svd":
        if settings.svd_forward_chunking:
            pipe.unet.enable_forward_chunking()
        from video_diffusion.models.speedups import DeepCache, install_cross_attention

        install_cross_attention(pipe.unet)
        if settings.svd_compile:
            compile_blocks(pipe.unet)
        deep_cache = DeepCache(pipe.unet)  # after compiling: its bookkeeping stays outside the compiled graphs
    elif settings.svd_compile:
        compile_blocks(FAMILIES[model.family].denoiser(pipe))
    return VideoGenerator(pipe, model, device, dtype_name, deep_cache=deep_cache, compiled=settings.svd_compile,
                          cache_interval=settings.svd_cache_interval)


COMPILE_BACKEND = "inductor"  # tests use "eager": the same tracing, without minutes of code generation on a CPU


def compile_blocks(denoiser) -> None:
    """torch.compile each block of the denoiser: the UNet's down, mid and up blocks, a transformer's blocks. Not the
    network as one graph: the deep-feature reuse decides in Python, between blocks, which ones run. No CUDA graphs
    ("reduce-overhead"): their outputs are overwritten by the next replay, and the reuse keeps one block's output
    across steps."""
    import torch

    torch._logging.set_logs(recompiles=True)  # a new shape compiles again: say so in the log
    for block in blocks_of(denoiser):
        block.forward = torch.compile(block.forward, backend=COMPILE_BACKEND)


def blocks_of(denoiser) -> list:
    """The blocks a denoiser runs in turn: a UNet's down, mid and up blocks, a transformer's blocks."""
    if hasattr(denoiser, "down_blocks"):
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]
    return list(getattr(denoiser, "blocks", None) or denoiser.transformer_blocks)


def _drop_torchvision_notice(record: logging.LogRecord) -> bool:
    return "requires torchvision" not in record.getMessage()


def _quiet_processor_warning() -> None:
    """diffusers' SVD module imports `CLIPImageProcessor` by name, and transformers then warns that it needs
    torchvision and falls back to the Pillow processor. Pillow is the backend we choose (`assemble`; the
    pipeline resizes with Pillow anyway), so that warning, which reads like a missing dependency, says nothing true
    here: drop exactly it, before diffusers is imported. One filter however often this runs (the logger keeps a
    filter once)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_notice)


def _from_pretrained(cls, source: str, dtype, want_fp16_variant: bool, **parts):
    if want_fp16_variant:
        try:
            return cls.from_pretrained(source, dtype=dtype, variant="fp16", **parts)
        except (OSError, ValueError) as exc:
            # Folders and repos without fp16 files: load the full-precision files and cast them.
            log.info("no fp16 variant of %s (%s); loading the default weights as float16", source, exc)
    return cls.from_pretrained(source, dtype=dtype, **parts)
