"""The one schema of generation parameters: validation, README's table and the API docs derive from it."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any, Mapping

import encoders
from video_diffusion.errors import InvalidParameter, UnknownParameter
from video_diffusion.media.postprocess import output_frames

MAX_SEED = 2**32 - 1
DEFAULT_MAX_GUIDANCE = 3.0  # SVD's; a model may name its own (pipeline.CONSISTENCY_DEFAULTS)


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # int, float or str
    default: Any  # None: decided later (the model's own, or random for the seed)
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    multiple_of: int | None = None
    default_text: str | None = None  # how README shows a default that is decided later

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        text = f"{_fmt(self.minimum)} to {_fmt(self.maximum)}"
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        return text

    def parse(self, raw: str) -> Any:
        """The typed value of `raw`, or InvalidParameter naming the field, the value and what is allowed."""
        text = raw.strip()
        if self.choices:
            if text.lower() not in self.choices:
                raise self._invalid(raw)
            return text.lower()
        try:
            value = self.type(text)
        except ValueError:
            kind = "a whole number" if self.type is int else "a number"
            raise InvalidParameter(f"`{self.name}` must be {kind} ({self.allowed()}), got {raw!r}",
                                   field=self.name) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise self._invalid(raw)
        if not self.minimum <= value <= self.maximum or (self.multiple_of and value % self.multiple_of):
            raise self._invalid(raw)
        return value

    def _invalid(self, raw: str) -> InvalidParameter:
        return InvalidParameter(f"`{self.name}` must be {self.allowed()}, got {raw!r}", field=self.name)


def _fmt(number: float | None) -> str:
    return str(int(number)) if number is not None and float(number).is_integer() else str(number)


SIZINGS = ("crop", "fit", "source")
FORMATS = tuple(encoders.FORMATS)  # what the encoders can write, in the order the docs list them
LOOPS = ("none", "pingpong", "crossfade")
GIF_MAX_FPS = 50  # GIF delays are hundredths of a second, and browsers slow down delays under 2 of them

PARAMS = (
    Param("motion_bucket_id", int, 127, "Motion intensity: higher moves more.", 1, 255),
    Param("fps", int, 6, "Frames per second: the playback rate and the model's fps conditioning.", 1, 30),
    Param("num_frames", int, None, "Number of frames to generate.", 14, 30,
          default_text="model's (svd 14, svd-xt 25, tiny 14) or `VIDEO_FRAMES`"),
    Param("decode_chunk_size", int, 8, "Frames the VAE decodes at once: lower needs less GPU memory.", 1, 16),
    Param("num_inference_steps", int, None, "Denoising steps: more is slower and cleaner.", 1, 100,
          default_text="25 (tiny: 8, animatelcm-svd-xt: 4, at most 40)"),
    Param("noise_aug_strength", float, 0.02, "Noise added to the input image: higher departs further from it.",
          0, 1),
    Param("min_guidance_scale", float, 1.0, "Guidance at the first frame.", 0, 20),
    Param("max_guidance_scale", float, None, "Guidance at the last frame (at least min_guidance_scale). Above 1 the "
          "UNet runs twice per step (with and without the image).", 0, 20,
          default_text="3.0 (animatelcm-svd-xt: 1.2)"),
    Param("seed", int, None, "Random seed; the same seed and parameters give the same video.", 0, MAX_SEED,
          default_text="random (returned in `X-Seed`)"),
    Param("width", int, None, "Output width in pixels.", 64, 2048, multiple_of=8,
          default_text="`VIDEO_WIDTH`, else 1024 (tiny: 256)"),
    Param("height", int, None, "Output height in pixels.", 64, 2048, multiple_of=8,
          default_text="`VIDEO_HEIGHT`, else 576 (tiny: 144)"),
    Param("sizing", str, "crop", "How the image meets width x height: `crop` covers then centre-crops; `fit` "
          "keeps the aspect inside width x height, sides rounded down to multiples of 64; `source` uses the "
          "image's own size rounded to 64.", choices=SIZINGS),
    Param("format", str, "mp4", "Output: `mp4` (H.264), `webm` (VP9), `gif` (one shared palette), `webp` "
          "(animated), `frames` (a ZIP of lossless PNGs `frame_0000.png`, ...).", choices=FORMATS),
    Param("loop", str, "none", "`pingpong` plays forward then back (2N-2 frames) so that repeating it loops "
          "seamlessly; `crossfade` dissolves the last quarter of the frames into the first frame (N frames).",
          choices=LOOPS),
    Param("output_fps", int, None, "Playback rate of the file. Above `fps`, in-between frames are made by "
          "motion-compensated interpolation and the duration stays N / fps; below, frames are dropped evenly. "
          f"GIF: at most {GIF_MAX_FPS}.", 1, 60, default_text="`fps`"),
    Param("cache_interval", int, 1, "Speed against fidelity: N > 1 runs the UNet's deep blocks every N-th step only "
          "and reuses their output in between (DeepCache); 1 computes every step. 2 or 3 is faster with a small "
          "change in the frames.", 1, 5, default_text="`SVD_CACHE_INTERVAL`, else 1"),
    Param("segments", int, 1, "Longer videos: each segment continues from the last frame of the one before "
          "(seed + 1 each), colour-matched to the first; N + (segments - 1) x (N - 1) frames.", 1, 4),
)
NAMES = tuple(p.name for p in PARAMS)


def capped(max_dimension: int, max_steps: int, cache_interval: int = 1) -> tuple[Param, ...]:
    """The schema as one deployment accepts it: MAX_DIMENSION and MAX_STEPS narrow the ranges, SVD_CACHE_INTERVAL
    sets the default `cache_interval`."""
    caps = {"width": max_dimension, "height": max_dimension, "num_inference_steps": max_steps}
    params = tuple(replace(p, maximum=min(p.maximum, caps[p.name])) if p.name in caps else p for p in PARAMS)
    return tuple(replace(p, default=cache_interval) if p.name == "cache_interval" else p for p in params)


def parse_params(raw: Mapping[str, str], params: tuple[Param, ...] = PARAMS, *, max_output_frames: int = 600,
                 default_frames: int = 25, default_max_guidance: float = DEFAULT_MAX_GUIDANCE) -> dict[str, Any]:
    """Validate raw form/query values; returns every parameter, None where the model decides later.

    The seed is drawn here when not given, so a client learns it before the task runs. `default_frames` and
    `default_max_guidance` are the model's, assumed when the request leaves them to it, to check limits now.
    """
    unknown = sorted(set(raw) - set(NAMES))
    if unknown:
        raise UnknownParameter(f"unknown parameter `{unknown[0]}`; known: {', '.join(NAMES)}", field=unknown[0])
    values = {p.name: p.parse(raw[p.name]) if raw.get(p.name, "").strip() else p.default for p in params}
    given = values["max_guidance_scale"]
    if values["min_guidance_scale"] > (default_max_guidance if given is None else given):
        raise InvalidParameter(
            f"`min_guidance_scale` ({values['min_guidance_scale']}) must not exceed `max_guidance_scale` "
            f"({given if given is not None else f'the model default, {default_max_guidance}'})",
            field="min_guidance_scale")
    for name, other in (("width", "height"), ("height", "width")):
        if values[name] is not None and values["sizing"] == "source":
            raise InvalidParameter(f"`{name}` does not apply with sizing=source (the image's own size is used)",
                                   field=name)
        if values[name] is not None and values[other] is None:
            raise InvalidParameter(f"`{other}` is needed with `{name}`", field=other)
    if values["format"] == "gif" and (values["output_fps"] or values["fps"]) > GIF_MAX_FPS:
        raise InvalidParameter(f"`output_fps` must be at most {GIF_MAX_FPS} with format=gif (GIF frame delays are "
                               f"hundredths of a second), got {values['output_fps']}", field="output_fps")
    check_output_frames(values, values["num_frames"] or default_frames, max_output_frames)
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(MAX_SEED + 1)
    return values


def output_frame_count(values: Mapping[str, Any], num_frames: int) -> int:
    """Frames in the file: after segments, loop and the change of frame rate."""
    return output_frames(num_frames, values["segments"], values["loop"], values["fps"],
                         values["output_fps"] or values["fps"])


def check_output_frames(values: Mapping[str, Any], num_frames: int, limit: int) -> None:
    """422 naming the parameters that make the video longer than MAX_OUTPUT_FRAMES."""
    count = output_frame_count(values, num_frames)
    if count <= limit:
        return
    named = [name for name, default in (("num_frames", None), ("segments", 1), ("loop", "none"), ("output_fps", None))
             if values[name] != default and not (name == "output_fps" and values[name] == values["fps"])]
    named = named or ["num_frames"]
    raise InvalidParameter(f"{', '.join(f'`{n}`' for n in named)} would make {count} frames; this server's "
                           f"MAX_OUTPUT_FRAMES is {limit}", field=named[-1])


def resolve_defaults(values: Mapping[str, Any], model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Fill what the model decides (`num_frames`, `num_inference_steps`, `width`, `height`, `max_guidance_scale`)."""
    resolved = {**{p.name: p.default for p in PARAMS}, **values}  # a record from before a parameter existed
    for name in ("num_frames", "num_inference_steps", "width", "height"):
        if resolved[name] is None:
            resolved[name] = model_defaults[name]
    if resolved["max_guidance_scale"] is None:
        # An API that could not tell the model checked min against 3.0: the model's own never goes below min.
        resolved["max_guidance_scale"] = max(model_defaults.get("max_guidance_scale", DEFAULT_MAX_GUIDANCE),
                                             resolved["min_guidance_scale"])
    if resolved.get("output_fps") is None:
        resolved["output_fps"] = resolved["fps"]
    return resolved


def schema(params: tuple[Param, ...] = PARAMS) -> list[dict[str, Any]]:
    """The parameters as JSON, for clients and the web page."""
    out = []
    for p in params:
        item = {"name": p.name, "type": {int: "integer", float: "number", str: "string"}[p.type],
                "default": p.default, "help": p.help}
        if p.choices:
            item["enum"] = list(p.choices)
        else:
            item["minimum"], item["maximum"] = p.minimum, p.maximum
        if p.multiple_of:
            item["multipleOf"] = p.multiple_of
        if p.default_text:
            item["default_text"] = p.default_text
        out.append(item)
    return out


def params_markdown() -> str:
    """README's table of generation parameters."""
    rows = ["| Parameter | Default | Allowed | Description |", "|---|---|---|---|"]
    for p in PARAMS:
        default = p.default_text or f"`{p.default}`"
        rows.append(f"| `{p.name}` | {default} | {p.allowed()} | {p.help} |")
    return "\n".join(rows)
