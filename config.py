"""Settings: one frozen value built from the environment, `.env` and the defaults below."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from dotenv import dotenv_values


# Pillow refuses to open an image past twice its MAX_IMAGE_PIXELS default (89478485), whatever the caller allows.
PILLOW_HARD_LIMIT = 2 * 89_478_485


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


def _http_url(example: str):
    def parse(value: str) -> str | None:
        """An absolute http(s) URL with a host and no query, kept without its trailing slash; empty: unset."""
        from urllib.parse import urlsplit

        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"must be an absolute http(s) URL such as {example}")
        return value.rstrip("/")

    return parse


_public_url = _http_url("https://videos.example.com/vd")


def _result_store(value: str) -> str:
    """`redis`, an absolute folder path, or `s3://bucket[/prefix]`."""
    from urllib.parse import urlsplit

    value = value.strip()
    if value == "redis":
        return value
    if value.startswith("s3://"):
        parts = urlsplit(value)
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError("must be s3://bucket or s3://bucket/prefix")
        return f"s3://{parts.netloc}" + (f"/{parts.path.strip('/')}" if parts.path.strip("/") else "")
    if value.startswith("/"):
        return value.rstrip("/") or "/"
    raise ValueError("must be redis, an absolute folder path, or s3://bucket/prefix")


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _allow_list(value: str) -> tuple[str, ...]:
    from video_diffusion.delivery.webhooks import parse_allow

    entries = _list(value)
    parse_allow(entries)  # ValueError names the entry
    return entries


def _webhook_secret(value: str) -> str:
    from video_diffusion.delivery.webhooks import parse_secret

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
    """One setting as the environment names it: its variable, default, parser and help (docs/configuration.md's table)."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    secret: bool = False  # never shown: not in a repr, not in an error message


def _setting(default: Any, parse: Callable[[str], Any], help: str, secret: bool = False) -> Any:
    return field(default=default, repr=not secret, metadata={"parse": parse, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every setting, typed, with its default, parser and help; each field is the variable of its upper-cased name
    (precedence: environment, then `.env`, then the default here: edit a default to change every deployment that
    does not override it)."""

    svd_model: str | None = _setting(None, _optional_text,
        "The model: `svd`, `svd-xt`, `svd-xt-1-1`, `animatelcm-svd-xt` (4 steps), `wan2.2-ti2v-5b`, "
        "`wan2.1-i2v-14b-480p`, `wan2.1-i2v-14b-720p`, `ltx-video`, any Hugging Face repo id, a local diffusers "
        "folder (its family read from its `model_index.json`), or `tiny`, `tiny-wan`, `tiny-ltx` (random weights, "
        "output is noise). Unset: `svd-xt` when a GPU is found, else `tiny`.")
    model: str | None = _setting(None, _optional_text,
        "The same setting as `SVD_MODEL` under a neutral name: set either (both, only to the same value).")
    svd_device: str = _setting("auto", _choice("auto", "cuda", "mps", "cpu"), "`auto` picks cuda, then mps, then cpu.")
    svd_dtype: str = _setting("auto", _choice("auto", "float16", "bfloat16", "float32"),
        "`auto`: on cuda float16 for SVD (fp16 weights), bfloat16 for Wan and LTX-Video; float32 elsewhere.")
    svd_offload: str = _setting("none", _choice("none", "model", "sequential", "group"),
        "CPU offload for small cards (cuda only), any family: `model` moves whole models, `group` one transformer "
        "or UNet block at a time, `sequential` layer by layer (least memory, slowest).")
    vae_tiling: bool = _setting(False, _bool,
        "Decode the video in tiles (Wan, LTX-Video): less GPU memory at large sizes, a little slower. SVD's decoder "
        "works in chunks of frames instead (`decode_chunk_size`).")
    svd_forward_chunking: bool = _setting(False, _bool,
        "Chunk the UNet's feed-forward layers: less memory, a little slower.")
    svd_compile: bool = _setting(False, _bool,
        "torch.compile the UNet's blocks, with a warm-up at the default size during start-up (`/health` "
        "answers 503 `warming_up` until it is done; other sizes compile again on their first request).")
    svd_cache_interval: int = _setting(1, _int(1, 5), "Default `cache_interval`: 1 computes every step in full.")
    cuda_visible_devices: str | None = _setting(None, _optional_text,
        "Which GPU(s) the process sees (read by CUDA; set it before the model loads).")
    video_width: int | None = _setting(None, _int(64, 2048, optional=True),
        "Default `width`, a multiple of what the model needs (8 for SVD, 16 or 32 for Wan, 32 for LTX-Video); "
        "unset: the model's own.")
    video_height: int | None = _setting(None, _int(64, 2048, optional=True),
        "Default `height`, as `VIDEO_WIDTH`.")
    video_frames: int | None = _setting(None, _int(1, 1000, optional=True),
        "Default `num_frames`, within the model's range and rule (svd 14-30; wan 4k+1; ltx-video 8k+1); unset: the "
        "model's own.")
    video_output_path: str = _setting("./data/videos", _text,
        "Where task records, inputs and videos are written (`/data/videos` in the image).")
    result_ttl: int = _setting(86400, _int(1), "Seconds a finished video stays downloadable.")
    host: str = _setting("0.0.0.0", _text, "Address `make run` binds.")
    port: int = _setting(5013, _int(1, 65535), "Port `make run` binds.")
    max_upload_mb: int = _setting(20, _int(1, 1024), "Largest request body, in MiB (413 beyond).")
    max_image_pixels: int = _setting(40_000_000, _int(4096, PILLOW_HARD_LIMIT),
        "Largest input image, width x height (413 beyond); at most Pillow's own hard limit, 178956970.")
    max_queue: int = _setting(8, _int(1, 100000),
        "Requests that may wait behind the running one; more get 503 at once (at least 1).")
    max_event_streams: int = _setting(16, _int(1, 1000),
        "`/status/{id}/events` streams open at once; more get 503 (the web page then polls).")
    request_timeout: int = _setting(60, _int(1, 3600),
        "Seconds a client has to send a whole request (and at most 15 of them without a byte); then 408.")
    max_dimension: int = _setting(2048, _int(64, 2048),
        "Largest `width`/`height` (and `sizing=source` side) accepted: a cap for small cards.")
    max_steps: int = _setting(100, _int(1, 100), "Largest `num_inference_steps` accepted.")
    max_output_frames: int = _setting(600, _int(14, 100000),
        "Most frames one video may have after `segments`, `loop` and `output_fps` (422 beyond): bounds "
        "the work of one request.")
    max_output_mb: int = _setting(4096, _int(1, 1048576),
        "Most MiB one video's frames may take in memory, frames x width x height x 3 after `segments`, `loop` and "
        "`output_fps` (422 naming the parameters beyond); the post-steps keep their peak within 1.5x of it.")
    max_storage_mb: int | None = _setting(None, _int(1, None, optional=True),
        "Most MiB of inputs and videos the data folder may hold (unset: no byte cap); a request that would pass "
        "it is 507 storage_full with Retry-After, and /health answers 503 storage_full while it is reached.")
    min_free_disk_mb: int = _setting(1024, _int(0, None),
        "Free disk space, in MiB, the service always leaves on the data folder's disk: a request that would go "
        "below it is 507 storage_full, and /health answers 503 storage_full while the disk is below it.")
    result_cache: bool = _setting(True, _bool,
        "Answer a repeat of a request that names its `seed` (same image pixels, parameters and model) "
        "from the earlier video while it is kept, with `X-Cache: hit`.")
    generate_mode: str = _setting("sync", _choice("sync", "async"),
        "What `POST /generate` does without a `Prefer` header.")
    job_timeout: int = _setting(1800, _int(1),
        "Seconds one generation may run; it then stops at its next step and fails with `timeout`.")
    queue_timeout: int = _setting(3600, _int(1),
        "Seconds a task may wait in line; after that it fails with `queue_timeout` and never runs.")
    sync_timeout: int = _setting(600, _int(1),
        "Seconds a synchronous request waits; then 504 with the task id, and the task goes on.")
    redis_url: str | None = _setting(None, _optional_text, "Redis for scale-out, e.g. `redis://redis:6379/0`.")
    result_store: str = _setting("redis", _result_store,
        "Redis mode: where inputs and videos live. `redis` (in Redis: small setups), an absolute folder every API "
        "replica and worker mounts, or `s3://bucket/prefix` (any S3-compatible store; `S3_ENDPOINT_URL` and the "
        "standard `AWS_*` credential variables). Redis then holds records only.")
    s3_endpoint_url: str | None = _setting(None, _http_url("http://minio:9000"),
        "With `RESULT_STORE=s3://...`: the store's URL (MinIO, Garage, Ceph RGW, R2); unset: AWS S3.")
    result_redirect: bool = _setting(False, _bool,
        "With `RESULT_STORE=s3://...`: `GET /results/{id}` answers 307 to a presigned URL (valid 5 minutes) instead "
        "of streaming the video through the API.")
    redis_host: str | None = _setting(None, _optional_text, "Redis host (seed form; `REDIS_URL` wins).")
    redis_port: int = _setting(6379, _int(1, 65535), "Redis port, with `REDIS_HOST`.")
    worker_ttl: int = _setting(30, _int(3, 3600),
        "Redis mode: seconds after which a silent worker counts as gone and its task fails `abandoned`.")
    worker_metrics_port: int = _setting(9101, _int(0, 65535),
        "Redis mode: port each worker serves its own `/metrics` (and `/livez`) on, bound to `HOST`, with the API "
        "key unless `METRICS_PUBLIC`; 0 or a port already taken (a second worker on the host): a free port, "
        "logged and named in the worker's heartbeat (`metrics_port`).")
    api_key: tuple[str, ...] | None = _setting(None, _list,
        "One key or a comma-separated list: every route but `/health`, `/livez` and the web page then needs "
        "`Authorization: Bearer <key>` or `X-API-Key: <key>`. Each key is a tenant: its tasks, cached results and "
        "Idempotency-Keys are its own (other keys get 404).", secret=True)
    admin_api_key: str | None = _setting(None, _optional_text,
        "A key that sees and cancels every tenant's tasks (it submits as its own tenant); needs API_KEY.",
        secret=True)
    webhook_allow: tuple[str, ...] | None = _setting(None, _allow_list,
        "Comma-separated hosts (`host`, `host:port`, `[v6]:port`) that `webhook` URLs may name; unset: "
        "webhooks are refused. A name that resolves to a loopback, private or link-local address is called "
        "only if that address is listed too.")
    webhook_secret: str | None = _setting(None, _webhook_secret,
        "`whsec_<base64 key>`: webhook deliveries are signed (Standard Webhooks); unset: unsigned.", secret=True)
    webhook_outbox_max: int = _setting(10_000, _int(1, 10_000_000),
        "Most webhook deliveries kept waiting (to be sent or retried); beyond it the oldest are dropped and counted "
        "(`video_diffusion_webhook_deliveries_total{outcome=\"dropped\"}`).")
    metrics_public: bool = _setting(False, _bool, "Serve `/metrics` without the API key.")
    cors_origins: tuple[str, ...] | None = _setting(None, _list,
        "Comma-separated origins allowed to call the API from a browser (`*` for any); unset: none.")
    public_url: str | None = _setting(None, _public_url,
        "The service's absolute address as clients reach it (e.g. `https://videos.example.com/vd` behind a proxy "
        "on a sub-path): the base of the `status_url` and `result_url` in webhook bodies. Unset: they are paths "
        "under the prefix the submitting request came through.")
    trusted_proxies: int = _setting(0, _int(0, 10),
        "Reverse proxies in front: trust that many hops of `X-Forwarded-*` (0: ignore them).")
    log_level: str = _setting("info", _choice("debug", "info", "warning", "error"), "Log verbosity.")
    log_format: str = _setting("text", _choice("text", "json"), "`json` for one JSON object per log line.")

    @property
    def redis(self) -> str | None:
        """The Redis URL to use, or None for the embedded single-process mode."""
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port}/0"
        return None


VARIABLES = tuple(Variable(f.name.upper(), f.default, f.metadata["parse"], f.metadata["help"], f.metadata["secret"])
                  for f in fields(Settings))
SECRETS = tuple(v.name for v in VARIABLES if v.secret)


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
    if settings.model and settings.svd_model and settings.model != settings.svd_model:
        raise ConfigError(f"MODEL={settings.model!r} and SVD_MODEL={settings.svd_model!r}: they are the same setting; "
                          "set one of them")
    if settings.model:
        settings = replace(settings, svd_model=settings.model)
    if (settings.video_width is None) != (settings.video_height is None):
        raise ConfigError("VIDEO_WIDTH and VIDEO_HEIGHT: set both or neither")
    for name in ("video_width", "video_height"):
        if getattr(settings, name) is not None and getattr(settings, name) % 8:
            raise ConfigError(f"{name.upper()}={getattr(settings, name)}: must be a multiple of 8")
    return settings


def variables_markdown() -> str:
    """The table of environment variables (docs/configuration.md)."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for var in VARIABLES:
        value = str(var.default).lower() if isinstance(var.default, bool) else var.default
        default = "unset" if var.default is None else f"`{value}`"
        rows.append(f"| `{var.name}` | {default} | {var.help} |")
    return "\n".join(rows)
