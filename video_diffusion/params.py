"""The one schema of generation parameters: validation, docs/api.md's table and the OpenAPI document derive from it.

Every parameter is declared once here; one that only some model families take names them (`families`), and a
deployment's schema is the served model's share of it, narrowed by the model's limits and the settings
(`schema_for`)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any, Mapping

import encoders
from video_diffusion.errors import InvalidParameter, UnknownParameter
from video_diffusion.media.postprocess import chained_frames, looped_frames, output_frames

MAX_SEED = 2**32 - 1
DEFAULT_MAX_GUIDANCE = 3.0  # SVD's; a model may name its own (models/svd.py: CONSISTENCY_DEFAULTS)
MAX_PROMPT = 2000  # characters
FAMILIES = {"svd": "SVD", "wan": "Wan", "ltx": "LTX-Video"}  # family -> how users name it
SVD = ("svd",)
PROMPTED = ("wan", "ltx")


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
    default_text: str | None = None  # how docs/api.md shows a default that is decided later
    remainder: int = 0  # with multiple_of: value % multiple_of == remainder (1: Wan's 4k+1 frames)
    max_length: int | None = None  # text without choices: at most this many characters
    families: tuple[str, ...] = ()  # the families whose models take it; empty: every family

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.type is str:
            return f"text of at most {self.max_length} characters"
        text = f"{_fmt(self.minimum)} to {_fmt(self.maximum)}"
        if self.multiple_of and self.remainder:
            first = self.minimum + (self.remainder - self.minimum) % self.multiple_of
            examples = ", ".join(str(int(first + i * self.multiple_of)) for i in range(3))
            text += f", {self.multiple_of}k+{self.remainder} ({examples}, ...)"
        elif self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        return text

    def taken_by(self, family: str) -> bool:
        return not self.families or family in self.families

    def parse(self, raw: str) -> Any:
        """The typed value of `raw`, or InvalidParameter naming the field, the value and what is allowed."""
        text = raw.strip()
        if self.choices:
            if text.lower() not in self.choices:
                raise self._invalid(raw)
            return text.lower()
        if self.type is str:
            if len(text) > self.max_length:
                raise InvalidParameter(f"`{self.name}` must be at most {self.max_length} characters, got "
                                       f"{len(text)}", field=self.name)
            return text
        try:
            value = self.type(text)
        except ValueError:
            kind = "a whole number" if self.type is int else "a number"
            raise InvalidParameter(f"`{self.name}` must be {kind} ({self.allowed()}), got {raw!r}",
                                   field=self.name) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise self._invalid(raw)
        if not self.minimum <= value <= self.maximum or (self.multiple_of
                                                          and value % self.multiple_of != self.remainder):
            raise self._invalid(raw)
        return value

    def _invalid(self, raw: str) -> InvalidParameter:
        return InvalidParameter(f"`{self.name}` must be {self.allowed()}, got {raw!r}", field=self.name)


def _fmt(number: float | None) -> str:
    return str(int(number)) if number is not None and float(number).is_integer() else str(number)


SIZINGS = ("crop", "fit", "source")
FORMATS = tuple(encoders.FORMATS)  # what the encoders can write, in the order the docs list them
LOOPS = ("none", "pingpong", "crossfade")
CACHE_PRESETS = ("off", "fast")
GIF_MAX_FPS = 50  # GIF delays are hundredths of a second, and browsers slow down delays under 2 of them

PARAMS = (
    Param("prompt", str, "", "What the video should show, in words (UTF-8); empty: guided by the image alone.",
          max_length=MAX_PROMPT, families=PROMPTED),
    Param("negative_prompt", str, "", "What the video should not show.", max_length=MAX_PROMPT, families=PROMPTED),
    Param("guidance_scale", float, None, "How strongly the prompt steers (classifier-free guidance). Above 1 the "
          "transformer runs twice per step (with and without the prompt); 1 turns guidance off.", 1, 20,
          default_text="model's (wan 5.0, ltx-video 3.0)", families=PROMPTED),
    Param("motion_bucket_id", int, 127, "Motion intensity: higher moves more.", 1, 255, families=SVD),
    Param("fps", int, None, "Frames per second: the playback rate (and SVD's and LTX's fps conditioning).", 1, 30,
          default_text="model's (svd 6, wan 16 or 24, ltx-video 24)"),
    Param("num_frames", int, None, "Number of frames to generate.", 14, 30,
          default_text="model's or `VIDEO_FRAMES` (svd 14, svd-xt 25; wan 4k+1: 81 or 121; ltx 8k+1: 161)"),
    Param("decode_chunk_size", int, 8, "Frames the VAE decodes at once: lower needs less GPU memory.", 1, 16,
          families=SVD),
    Param("num_inference_steps", int, None, "Denoising steps: more is slower and cleaner.", 1, 100,
          default_text="model's (svd 25, animatelcm-svd-xt 4 of at most 40, wan and ltx-video 50; tiny ones 2-8)"),
    Param("noise_aug_strength", float, 0.02, "Noise added to the input image: higher departs further from it.",
          0, 1, families=SVD),
    Param("min_guidance_scale", float, 1.0, "Guidance at the first frame.", 0, 20, families=SVD),
    Param("max_guidance_scale", float, None, "Guidance at the last frame (at least min_guidance_scale). Above 1 the "
          "UNet runs twice per step (with and without the image).", 0, 20,
          default_text="3.0 (animatelcm-svd-xt: 1.2)", families=SVD),
    Param("seed", int, None, "Random seed; the same seed and parameters give the same video.", 0, MAX_SEED,
          default_text="random (returned in `X-Seed`)"),
    Param("width", int, None, "Output width in pixels, a multiple of what the model needs (svd 8, wan 2.1 16, "
          "wan 2.2 and ltx-video 32).", 64, 2048, multiple_of=8,
          default_text="`VIDEO_WIDTH`, else the model's (svd 1024, wan 2.2 1280, ltx-video 704; tiny 256 or 64)"),
    Param("height", int, None, "Output height in pixels (multiples as for width).", 64, 2048, multiple_of=8,
          default_text="`VIDEO_HEIGHT`, else the model's (svd 576, wan 2.2 704, ltx-video 480; tiny 144 or 64)"),
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
          "change in the frames.", 1, 5, default_text="`SVD_CACHE_INTERVAL`, else 1", families=SVD),
    Param("cache", str, "off", "Speed against fidelity for Wan and LTX-Video: `fast` reuses the transformer's work "
          "between steps (diffusers' First Block Cache, threshold 0.1: when the first block's output barely changed "
          "since the step before, the other blocks' change is reused); `off` computes every step in full.",
          choices=CACHE_PRESETS, families=PROMPTED),
    Param("segments", int, 1, "Longer videos: each segment continues from the last frame of the one before "
          "(seed + 1 each), colour-matched to the first; N + (segments - 1) x (N - 1) frames.", 1, 4),
)
NAMES = tuple(p.name for p in PARAMS)
BY_NAME = {p.name: p for p in PARAMS}


def schema_for(family: str, *, max_dimension: int, max_steps: int, cache_interval: int = 1,
               frames: tuple[int, int, int] = (14, 30, 1), size_multiple: int = 8, fps: int = 6) -> tuple[Param, ...]:
    """The schema one deployment accepts: the served family's parameters, num_frames and the sizes by the model's
    rules, its frame rate the default `fps`, MAX_DIMENSION and MAX_STEPS narrowing the ranges, SVD_CACHE_INTERVAL
    the default `cache_interval`."""
    least, most, step = frames
    changes = {
        "width": {"maximum": min(2048, max_dimension), "multiple_of": size_multiple,
                  "minimum": max(64, size_multiple)},
        "height": {"maximum": min(2048, max_dimension), "multiple_of": size_multiple,
                   "minimum": max(64, size_multiple)},
        "num_inference_steps": {"maximum": min(100, max_steps)},
        "num_frames": {"minimum": least, "maximum": most, "multiple_of": step if step > 1 else None,
                       "remainder": 1 if step > 1 else 0},
        "cache_interval": {"default": cache_interval},
        "fps": {"default": fps},
    }
    return tuple(replace(p, **changes.get(p.name, {})) for p in PARAMS if p.taken_by(family))


def taken_by(name: str) -> str:
    """Which models take a parameter, in words: "Wan and LTX-Video models"."""
    return " and ".join(FAMILIES[f] for f in BY_NAME[name].families) + " models"


def parse_params(raw: Mapping[str, str], params: tuple[Param, ...] = (), *, max_output_frames: int = 600,
                 defaults: Mapping[str, Any] | None = None, served: str = "this model") -> dict[str, Any]:
    """Validate raw form/query values against the served schema `params` (SVD's when not given); returns each of
    its parameters, None where the model decides later.

    The seed is drawn here when not given, so a client learns it before the task runs. `defaults` are the model's
    (num_frames, fps, max_guidance_scale), assumed where the request leaves a value to it, to check limits now. A
    parameter of another family is refused, naming the models that take it and `served`: never silently ignored.
    """
    params = params or tuple(p for p in PARAMS if p.taken_by("svd"))
    defaults = {"num_frames": 25, "fps": 6, "max_guidance_scale": DEFAULT_MAX_GUIDANCE, **(defaults or {})}
    default_max_guidance = defaults["max_guidance_scale"]
    unknown = sorted(set(raw) - set(NAMES))
    if unknown:
        raise UnknownParameter(f"unknown parameter `{unknown[0]}`; known: {', '.join(NAMES)}", field=unknown[0])
    schema_names = {p.name for p in params}
    foreign = [name for name in NAMES if name in raw and name not in schema_names]
    if foreign:
        raise InvalidParameter(f"`{foreign[0]}` is taken by {taken_by(foreign[0])}; this server serves {served}",
                               field=foreign[0])
    values = {p.name: p.parse(raw[p.name]) if raw.get(p.name, "").strip() else p.default for p in params}
    given = values.get("max_guidance_scale")
    if "min_guidance_scale" in values and values["min_guidance_scale"] > (default_max_guidance if given is None
                                                                          else given):
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
    fps = values["fps"] or defaults["fps"]
    if values["format"] == "gif" and (values["output_fps"] or fps) > GIF_MAX_FPS:
        raise InvalidParameter(f"`output_fps` must be at most {GIF_MAX_FPS} with format=gif (GIF frame delays are "
                               f"hundredths of a second), got {values['output_fps']}", field="output_fps")
    check_output_frames({**values, "fps": fps}, values["num_frames"] or defaults["num_frames"], max_output_frames)
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(MAX_SEED + 1)
    return values


def output_frame_count(values: Mapping[str, Any], num_frames: int) -> int:
    """Frames in the file: after segments, loop and the change of frame rate."""
    return output_frames(num_frames, values["segments"], values["loop"], values["fps"],
                         values["output_fps"] or values["fps"])


def _lengthening(values: Mapping[str, Any]) -> list[str]:
    """The parameters a request set that make its video longer than the model's own."""
    return [name for name, default in (("num_frames", None), ("segments", 1), ("loop", "none"), ("output_fps", None))
            if values[name] != default and not (name == "output_fps" and values[name] == values["fps"])]


def check_output_frames(values: Mapping[str, Any], num_frames: int, limit: int) -> None:
    """422 naming the parameters that make the video longer than MAX_OUTPUT_FRAMES."""
    count = output_frame_count(values, num_frames)
    if count <= limit:
        return
    named = _lengthening(values) or ["num_frames"]
    raise InvalidParameter(f"{', '.join(f'`{n}`' for n in named)} would make {count} frames; this server's "
                           f"MAX_OUTPUT_FRAMES is {limit}", field=named[-1])


def check_output_memory(values: Mapping[str, Any], num_frames: int, width: int, height: int, limit_mb: int) -> int:
    """The bytes the video's frames take in memory at their most (after segments, loop or interpolation, whichever
    stage holds the most frames; frames x width x height x 3); 422 naming the parameters beyond MAX_OUTPUT_MB."""
    chained = chained_frames(num_frames, values["segments"])
    frames = max(chained, looped_frames(chained, values["loop"]), output_frame_count(values, num_frames))
    needed = frames * width * height * 3
    if needed <= limit_mb * 2**20:
        return needed
    named = [*(["width", "height"] if values.get("width") is not None else []), *_lengthening(values)]
    named = named or ["num_frames"]
    raise InvalidParameter(f"{', '.join(f'`{n}`' for n in named)} would make {frames} frames of {width}x{height}: "
                           f"{math.ceil(needed / 2**20)} MiB of frames; this server's MAX_OUTPUT_MB is {limit_mb}",
                           field=named[0])


def resolve_defaults(values: Mapping[str, Any], model_defaults: Mapping[str, Any],
                     family: str = "svd") -> dict[str, Any]:
    """Fill what the model decides (`num_frames`, `num_inference_steps`, `width`, `height`, `fps` where the model
    has its own, `max_guidance_scale`, `guidance_scale`): the family's parameters, each with a value."""
    own = [p for p in PARAMS if p.taken_by(family)]
    resolved = {**{p.name: p.default for p in own}, **values}  # a record from before a parameter existed
    for name in ("num_frames", "num_inference_steps", "width", "height", "guidance_scale"):
        if name in resolved and resolved[name] is None:
            resolved[name] = model_defaults[name]
    if resolved["fps"] is None:
        resolved["fps"] = model_defaults.get("fps", 6)
    if family == "svd" and resolved["max_guidance_scale"] is None:
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
        elif p.type is str:
            item["maxLength"] = p.max_length
        else:
            item["minimum"], item["maximum"] = p.minimum, p.maximum
        if p.multiple_of and p.remainder:  # minimum, minimum + step, ...: 4k+1 frames
            item["step"] = p.multiple_of
        elif p.multiple_of:
            item["multipleOf"] = p.multiple_of
        if p.default_text:
            item["default_text"] = p.default_text
        out.append(item)
    return out


def params_markdown() -> str:
    """The table of generation parameters (docs/api.md)."""
    rows = ["| Parameter | Models | Default | Allowed | Description |", "|---|---|---|---|---|"]
    for p in PARAMS:
        default = p.default_text or f"`{p.default}`"
        models = ", ".join(FAMILIES[f] for f in p.families) if p.families else "all"
        rows.append(f"| `{p.name}` | {models} | {default} | {p.allowed()} | {p.help} |")
    return "\n".join(rows)
