"""Settings: one frozen value built from the environment, `.env` and the defaults below."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, Mapping

from dotenv import dotenv_values

# Defaults. Edit them here to change every deployment that does not override them
# (precedence: environment, then `.env`, then these values).
SVD_MODEL = None  # None: svd-xt when a GPU is found, else the tiny random-weight pipeline
SVD_DEVICE = "auto"
SVD_DTYPE = "auto"
SVD_OFFLOAD = "none"
SVD_FORWARD_CHUNKING = False
SVD_COMPILE = False
SVD_CACHE_INTERVAL = 1
CUDA_VISIBLE_DEVICES = None
VIDEO_WIDTH = None  # None: the model's own (1024x576 for SVD, 256x144 for tiny)
VIDEO_HEIGHT = None
VIDEO_FRAMES = None  # None: the model's own (svd 14, svd-xt 25, tiny 14)
VIDEO_OUTPUT_PATH = "./data/videos"
RESULT_TTL = 86400
HOST = "0.0.0.0"
PORT = 5013
MAX_UPLOAD_MB = 20
MAX_IMAGE_PIXELS = 40_000_000
MAX_QUEUE = 8
MAX_EVENT_STREAMS = 16
REQUEST_TIMEOUT = 60
GENERATE_MODE = "sync"
JOB_TIMEOUT = 1800
QUEUE_TIMEOUT = 3600
SYNC_TIMEOUT = 600
MAX_DIMENSION = 2048
MAX_STEPS = 100
MAX_OUTPUT_FRAMES = 600
RESULT_CACHE = True
WORKER_TTL = 30
WORKER_METRICS_PORT = 9101
API_KEY = None
WEBHOOK_ALLOW = None
WEBHOOK_SECRET = None
METRICS_PUBLIC = False
CORS_ORIGINS = None
TRUSTED_PROXIES = 0
LOG_FORMAT = "text"
REDIS_URL = None
REDIS_HOST = None
REDIS_PORT = 6379
LOG_LEVEL = "info"


class ConfigError(ValueError):
    """A setting has a value that is not allowed."""


def _text(value: str) -> str:
    return value


def _optional_text(value: str) -> str | None:
    return value or None


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.lower()

    return parse


def _int(low: int, high: int | None = None, optional: bool = False) -> Callable[[str], int | None]:
    def parse(value: str) -> int | None:
        if optional and value == "":
            return None
        try:
            number = int(value)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if number < low or (high is not None and number > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be at least {low}")
        return number

    return parse


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _allow_list(value: str) -> tuple[str, ...]:
    from webhooks import parse_allow

    entries = _list(value)
    parse_allow(entries)  # ValueError names the entry
    return entries


def _webhook_secret(value: str) -> str:
    from webhooks import parse_secret

    return parse_secret(value)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class Variable:
    """One setting: its name (and the module-level default of that name above), parser and help."""

    name: str
    parse: Callable[[str], Any]
    help: str

    @property
    def default(self) -> Any:
        return globals()[self.name]


VARIABLES = (
    Variable("SVD_MODEL", _optional_text,
             "`svd`, `svd-xt`, `svd-xt-1-1`, `animatelcm-svd-xt` (4 steps), any Hugging Face repo id, a local "
             "diffusers folder, or `tiny` (random weights, output is noise). Unset: `svd-xt` when a GPU is found, "
             "else `tiny`."),
    Variable("SVD_DEVICE", _choice("auto", "cuda", "mps", "cpu"),
             "`auto` picks cuda, then mps, then cpu."),
    Variable("SVD_DTYPE", _choice("auto", "float16", "bfloat16", "float32"),
             "`auto`: float16 (fp16 weights) on cuda, float32 elsewhere."),
    Variable("SVD_OFFLOAD", _choice("none", "model", "sequential"),
             "CPU offload for small cards (cuda only): `model` moves whole models, `sequential` layers."),
    Variable("SVD_FORWARD_CHUNKING", _bool,
             "Chunk the UNet's feed-forward layers: less memory, a little slower."),
    Variable("SVD_COMPILE", _bool,
             "torch.compile the UNet's blocks, with a warm-up at the default size during start-up (`/health` "
             "answers 503 `warming_up` until it is done; other sizes compile again on their first request)."),
    Variable("SVD_CACHE_INTERVAL", _int(1, 5), "Default `cache_interval`: 1 computes every step in full."),
    Variable("CUDA_VISIBLE_DEVICES", _optional_text,
             "Which GPU(s) the process sees (read by CUDA; set it before the model loads)."),
    Variable("VIDEO_WIDTH", _int(64, 2048, optional=True),
             "Default `width` (the model's own when unset: 1024, tiny 256)."),
    Variable("VIDEO_HEIGHT", _int(64, 2048, optional=True),
             "Default `height` (the model's own when unset: 576, tiny 144)."),
    Variable("VIDEO_FRAMES", _int(14, 30, optional=True),
             "Default `num_frames` (the model's own when unset: svd 14, svd-xt 25, tiny 14)."),
    Variable("VIDEO_OUTPUT_PATH", _text,
             "Where task records, inputs and videos are written (`/data/videos` in the image)."),
    Variable("RESULT_TTL", _int(1), "Seconds a finished video stays downloadable."),
    Variable("HOST", _text, "Address `make run` binds."),
    Variable("PORT", _int(1, 65535), "Port `make run` binds."),
    Variable("MAX_UPLOAD_MB", _int(1, 1024), "Largest request body, in MiB (413 beyond)."),
    Variable("MAX_IMAGE_PIXELS", _int(4096),
             "Largest input image, width x height (413 beyond); also Pillow's decompression-bomb limit."),
    Variable("MAX_QUEUE", _int(1, 100000),
             "Requests that may wait behind the running one; more get 503 at once (at least 1)."),
    Variable("MAX_EVENT_STREAMS", _int(1, 1000),
             "`/status/{id}/events` streams open at once; more get 503 (the web page then polls)."),
    Variable("REQUEST_TIMEOUT", _int(1, 3600),
             "Seconds a client has to send a whole request (and at most 15 of them without a byte); then 408."),
    Variable("MAX_DIMENSION", _int(64, 2048),
             "Largest `width`/`height` (and `sizing=source` side) accepted: a cap for small cards."),
    Variable("MAX_STEPS", _int(1, 100), "Largest `num_inference_steps` accepted."),
    Variable("MAX_OUTPUT_FRAMES", _int(14, 100000),
             "Most frames one video may have after `segments`, `loop` and `output_fps` (422 beyond): bounds "
             "the work, memory (frames x width x height x 3 bytes) and file size of one request."),
    Variable("RESULT_CACHE", _bool,
             "Answer a repeat of a request that names its `seed` (same image pixels, parameters and model) "
             "from the earlier video while it is kept, with `X-Cache: hit`."),
    Variable("GENERATE_MODE", _choice("sync", "async"),
             "What `POST /generate` does without a `Prefer` header."),
    Variable("JOB_TIMEOUT", _int(1),
             "Seconds one generation may run; it then stops at its next step and fails with `timeout`."),
    Variable("QUEUE_TIMEOUT", _int(1),
             "Seconds a task may wait in line; after that it fails with `queue_timeout` and never runs."),
    Variable("SYNC_TIMEOUT", _int(1),
             "Seconds a synchronous request waits; then 504 with the task id, and the task goes on."),
    Variable("REDIS_URL", _optional_text, "Redis for scale-out, e.g. `redis://redis:6379/0`."),
    Variable("REDIS_HOST", _optional_text, "Redis host (seed form; `REDIS_URL` wins)."),
    Variable("REDIS_PORT", _int(1, 65535), "Redis port, with `REDIS_HOST`."),
    Variable("WORKER_TTL", _int(3, 3600),
             "Redis mode: seconds after which a silent worker counts as gone and its task fails `abandoned`."),
    Variable("WORKER_METRICS_PORT", _int(0, 65535),
             "Redis mode: port each worker serves its Prometheus metrics on (0: off)."),
    Variable("API_KEY", _list,
             "One key or a comma-separated list: every route but `/health`, `/livez` and the web page then needs "
             "`Authorization: Bearer <key>` or `X-API-Key: <key>`."),
    Variable("WEBHOOK_ALLOW", _allow_list,
             "Comma-separated hosts (`host`, `host:port`, `[v6]:port`) that `webhook` URLs may name; unset: "
             "webhooks are refused. A name that resolves to a loopback, private or link-local address is called "
             "only if that address is listed too."),
    Variable("WEBHOOK_SECRET", _webhook_secret,
             "`whsec_<base64 key>`: webhook deliveries are signed (Standard Webhooks); unset: unsigned."),
    Variable("METRICS_PUBLIC", _bool, "Serve `/metrics` without the API key."),
    Variable("CORS_ORIGINS", _list,
             "Comma-separated origins allowed to call the API from a browser (`*` for any); unset: none."),
    Variable("TRUSTED_PROXIES", _int(0, 10),
             "Reverse proxies in front: trust that many hops of `X-Forwarded-*` (0: ignore them)."),
    Variable("LOG_LEVEL", _choice("debug", "info", "warning", "error"), "Log verbosity."),
    Variable("LOG_FORMAT", _choice("text", "json"), "`json` for one JSON object per log line."),
)


class _SettingsBase:
    @property
    def redis(self) -> str | None:
        """The Redis URL to use, or None for the embedded single-process mode."""
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port}/0"
        return None


# One frozen field per variable, lower-cased (settings.max_queue); the secrets never show in a repr.
SECRETS = ("API_KEY", "WEBHOOK_SECRET")
Settings = make_dataclass("Settings", [(v.name.lower(), Any, field(repr=v.name not in SECRETS)) for v in VARIABLES],
                          bases=(_SettingsBase,), frozen=True)


def load_settings(environ: Mapping[str, str] | None = None, dotenv_path: str | None = ".env") -> Settings:
    """Build Settings from `environ` (default: the process environment) over `.env` over the defaults."""
    source: dict[str, str] = {}
    from_dotenv: set[str] = set()
    if dotenv_path and os.path.exists(dotenv_path):
        source.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        from_dotenv = set(source)
    environ = os.environ if environ is None else environ
    from_dotenv -= set(environ)
    source.update(environ)
    values = {}
    for var in VARIABLES:
        raw = source.get(var.name)
        if raw is None or not raw.strip():  # `NAME=` means unset, as compose passes `${NAME:-}`
            values[var.name.lower()] = var.default
            continue
        try:
            values[var.name.lower()] = var.parse(raw.strip())
        except ValueError as exc:
            where = f" (set in {dotenv_path})" if var.name in from_dotenv else ""
            shown = "(hidden)" if var.name in SECRETS else repr(raw)
            raise ConfigError(f"{var.name}={shown}: {exc}{where}") from None
    settings = Settings(**values)
    if (settings.video_width is None) != (settings.video_height is None):
        raise ConfigError("VIDEO_WIDTH and VIDEO_HEIGHT: set both or neither")
    for name in ("video_width", "video_height"):
        if getattr(settings, name) is not None and getattr(settings, name) % 8:
            raise ConfigError(f"{name.upper()}={getattr(settings, name)}: must be a multiple of 8")
    return settings



def variables_markdown() -> str:
    """README's table of environment variables."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for var in VARIABLES:
        value = str(var.default).lower() if isinstance(var.default, bool) else var.default
        default = "unset" if var.default is None else f"`{value}`"
        rows.append(f"| `{var.name}` | {default} | {var.help} |")
    return "\n".join(rows)
