"""What a loaded model is to the rest of the service: a `ModelInfo` that describes it and a `Generator` that turns
one image into frames. Backends run any object that satisfies `Generator`; `check_generator` says at load time,
by name, what an object lacks, so a generator (or a test's stand-in) that drifts from the contract fails at once
rather than on some later request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
from PIL import Image

NOISE_NOTE = "random weights: the output is noise"

# progress(phase, step, total): called as generation moves on; may raise to stop it.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ModelInfo:
    name: str  # how users see it: "svd-xt", "tiny", a repo id, or a local folder's own name (never its path)
    source: str | None  # what from_pretrained loads; None builds the tiny pipeline in memory
    noise: bool  # random weights: outputs are noise, and every user-facing place says so
    defaults: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None  # a consistency sampler has a fixed number of noise levels to step through
    unet_weights: tuple[str, str] | None = None  # (repo, file) of a UNet state dict loaded over the source's UNet
    family: str = "svd"  # which family's pipeline, parameters and rules (models/families.py)
    frames: tuple[int, int, int] = (14, 30, 1)  # num_frames: least, most, and the step (4: 4k+1, as Wan's VAE)
    size_multiple: int = 8  # width and height: a multiple of what the VAE and the patching need

    def public(self) -> dict[str, Any]:
        """What a worker's heartbeat tells an API that holds no model: enough to validate against."""
        return {"name": self.name, "family": self.family, "noise": self.noise, "defaults": self.defaults,
                "max_steps": self.max_steps, "frames": list(self.frames), "size_multiple": self.size_multiple}

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(name=data["name"], source=None, noise=bool(data.get("noise")), defaults=dict(data["defaults"]),
                   max_steps=data.get("max_steps"), family=data.get("family", "svd"),
                   frames=tuple(data.get("frames", (14, 30, 1))), size_multiple=int(data.get("size_multiple", 8)))

    @property
    def label(self) -> str:
        """How the model is named to users (`X-Model`, `/health`)."""
        return f"{self.name} ({NOISE_NOTE})" if self.noise else self.name


@runtime_checkable
class Generator(Protocol):
    model: ModelInfo
    device: str  # "cuda", "mps" or "cpu"
    dtype: str  # "float16", "bfloat16" or "float32"
    needs_warm_up: bool  # backends call warm_up() before they take work

    def warm_up(self) -> None: ...

    def generate(self, image: Image.Image, params: dict[str, Any], progress: Progress) -> np.ndarray:
        """Frames (N x H x W x 3 uint8) for `image`, already sized to params' width x height."""

    def describe(self) -> dict[str, Any]:
        """What /health and a worker's heartbeat say about the loaded model: model, noise, device, dtype."""

    def memory_stats(self) -> dict[str, int]:
        """Accelerator memory gauges in bytes, by gauge name (empty where there are none)."""


_METHODS = ("warm_up", "generate", "describe", "memory_stats")
_ATTRIBUTES = ("model", "device", "dtype", "needs_warm_up")


def check_generator(candidate: object) -> Generator:
    """`candidate`, once it has every member of `Generator`; TypeError naming what it lacks otherwise."""
    missing = [name for name in _ATTRIBUTES if not hasattr(candidate, name)]
    missing += [name for name in _METHODS if not callable(getattr(candidate, name, None))]
    if not missing and not isinstance(getattr(candidate, "model"), ModelInfo):
        missing.append("model (a ModelInfo)")
    if missing:
        raise TypeError(f"{type(candidate).__name__} is not a Generator: it lacks {', '.join(missing)}")
    return candidate
