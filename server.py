"""The HTTP service: a request in, parsed and validated; a task to the backend; the answer out.

Everything around that lives elsewhere: every request's id, auth, CORS and errors in `middleware.py`, the
responses in `views.py`, the task lifecycle in `tasks.py`, where tasks run behind the `Backend` contract.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from pathlib import Path

from flask import Blueprint, Flask, current_app, jsonify, request, url_for
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Settings, load_settings
from pipeline import SVD_XT, LoadSettingError, describe_model, knows_family
from video_diffusion import errors
from video_diffusion.backends.contract import Backend
from video_diffusion.clock import Clock
from video_diffusion.delivery.webhooks import check_url, parse_allow, parse_events
from video_diffusion.lifecycle import idempotency
from video_diffusion.lifecycle.record import Task, TaskStatus, cache_key, is_task_id, new_task_id
from video_diffusion.media.images import decode_image, open_image, target_size
from video_diffusion.models.contract import ModelInfo
from video_diffusion.models.families import UnknownFamily
from video_diffusion.params import Param, check_output_memory, parse_params, resolve_defaults, schema, schema_for
from video_diffusion.telemetry import Telemetry, configure_logging
from video_diffusion.web import middleware
from video_diffusion.web.openapi import build_document
from video_diffusion.web.views import event_stream, status_response, video_response

log = logging.getLogger(__name__)
api = Blueprint("api", __name__)
page = Blueprint("page", __name__, static_folder="static", static_url_path="/static")

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
WEBHOOK_FIELDS = ("webhook", "webhook_events")
MODEL_FIELD = "model"  # which served model: picks the queue in a Redis deployment of several models
IDEMPOTENCY_WAIT = 5.0  # seconds a request waits for the same key's first request to be accepted, then 409
IMAGE_FIELDS = ("image", "file")
WAIT_SLICE = 0.5  # seconds between checks that a synchronous client is still connected
DECODES_AT_ONCE = 2  # a full-size decode can take ~100 MB: at most this many at a time


class Service:
    """What the routes share: settings, the backend, telemetry, the parameter schema, and the bounds on
    concurrent image decodes and event streams."""

    def __init__(self, settings: Settings, backend: Backend, telemetry: Telemetry):
        self.settings = settings
        self.backend = backend
        self.telemetry = telemetry
        # The model this deployment names, when it names one; a Redis API that names none learns it from its
        # workers' heartbeats (served_model), and until one is ready checks requests against SVD-XT's schema.
        self.configured = _configured_model(settings)
        # What "the same model" means for the result cache.
        self.webhook_allow = parse_allow(settings.webhook_allow or ())
        self.decodes = threading.BoundedSemaphore(DECODES_AT_ONCE)
        self.streams = threading.BoundedSemaphore(settings.max_event_streams)

    def served_model(self, requested: str | None = None) -> ModelInfo:
        """The model a request is for: the one it names (`model`), which must be served; else the one MODEL names
        when it is served, else the only one served (one loaded; in a Redis deployment, every ready worker's);
        with several and no default, the request must name one. Before any is ready: the one MODEL names, else
        SVD-XT's schema (what a worker with no MODEL loads on a GPU)."""
        served = self.backend.served_models()
        default = self.default_model_name()
        if requested:
            if requested in served:
                return served[requested]
            if not served and requested == default:
                return self._before_any_is_ready()
            if not served:
                raise errors.ModelNotReady("no model is ready yet to serve the one asked for; try again when one "
                                           "is", retry_after=10)
            raise errors.InvalidParameter(f"model must be one of the models served here: {', '.join(sorted(served))} "
                                          f"(got \"{requested[:100]}\")", field="model")
        if not served:
            return self._before_any_is_ready()
        if default in served:
            return served[default]
        if len(served) == 1:
            return next(iter(served.values()))
        raise errors.InvalidParameter(f"several models are served here ({', '.join(sorted(served))}): send `model` to "
                                      "pick one", field="model")

    def default_model_name(self) -> str | None:
        """The name MODEL gives the deployment's model (a folder by its own name, never its path), or None."""
        if self.configured is not None:
            return self.configured.name
        return Path(self.settings.svd_model.rstrip("/")).name if self.settings.svd_model else None

    def _before_any_is_ready(self) -> ModelInfo:
        if self.configured is not None:
            return self.configured
        if self.settings.redis and self.settings.svd_model:  # a folder or repo only the workers can read
            raise errors.ModelNotReady("no worker has reported the model it serves yet, and this API cannot read "
                                       "the folder or repo MODEL names; try again when a worker is ready",
                                       retry_after=10)
        return SVD_XT

    def model_identity(self, model: ModelInfo) -> str:
        """What, besides the request, decides a video's pixels: the model served (its name, source and family) and
        the settings that change its output. Part of every result-cache key, with the request's parameters as the
        server resolved them (the model's defaults and VIDEO_* where the request left a value to it)."""
        s = self.settings
        return json.dumps({"model": model.name, "source": model.source, "family": model.family,
                           "dtype": s.svd_dtype, "device": s.svd_device, "vae_tiling": s.vae_tiling,
                           "compile": s.svd_compile, "forward_chunking": s.svd_forward_chunking}, sort_keys=True)

    def schema(self, model: ModelInfo | None = None) -> tuple[Param, ...]:
        """The parameters this deployment accepts for the served model."""
        model = model or self.served_model()
        settings = self.settings
        max_steps = min(settings.max_steps, model.max_steps or settings.max_steps)
        return schema_for(model.family, max_dimension=settings.max_dimension, max_steps=max_steps,
                          cache_interval=settings.svd_cache_interval, frames=model.frames,
                          size_multiple=model.size_multiple, fps=model.defaults.get("fps", 6))

    def drain(self) -> None:
        """On SIGTERM: refuse new work, let the running task finish, keep queued async tasks for the next start."""
        log.info("draining: /health answers 503, new submissions are refused")
        self.backend.drain(self.settings.job_timeout)

    def interrupt(self) -> None:
        """A second Ctrl-C: stop now; what was running is recorded `interrupted` (queued async tasks stay)."""
        log.warning("stopping now: the running task is recorded interrupted")
        self.backend.interrupt()


def create_app(settings: Settings | None = None, *, backend: Backend | None = None, load=None,
               telemetry: Telemetry | None = None, clock: Clock | None = None) -> Flask:
    """The Flask app. `backend`, `load` (Settings -> Generator), `telemetry` and `clock` are for tests to inject."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    telemetry = telemetry or Telemetry()
    app = Flask(__name__, static_folder=None)  # the page blueprint serves the files, publicly
    app.url_map.merge_slashes = False  # `/status/%2Fevents` is an id that is no task (404), not a 308 elsewhere
    app.json.sort_keys = False  # bodies keep the order written (the OpenAPI document's content types first)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024, MAX_FORM_PARTS=64,
                      MAX_FORM_MEMORY_SIZE=1024 * 1024)
    backend = backend or _make_backend(settings, load, telemetry, clock or Clock())
    backend.start()
    telemetry.watch(backend)
    if settings.trusted_proxies:
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops, x_prefix=hops)
    app.extensions["video_diffusion"] = Service(settings, backend, telemetry)
    app.register_blueprint(api)
    app.register_blueprint(page)
    middleware.init_app(app)
    return app


def _configured_model(settings: Settings) -> ModelInfo | None:
    if not settings.svd_model or (settings.redis and not knows_family(settings.svd_model)):
        return None
    try:
        return describe_model(settings, gpu=False)
    except (LoadSettingError, UnknownFamily):  # the backend's load fails with the same sentence, in /health
        return None


def _make_backend(settings: Settings, load, telemetry: Telemetry, clock: Clock) -> Backend:
    if settings.redis:
        from video_diffusion.backends.redis_api import RedisBackend  # the API of a Redis deployment holds no model

        return RedisBackend(settings, telemetry=telemetry, clock=clock)
    from video_diffusion.backends.disk_store import DiskStore
    from video_diffusion.backends.embedded import EmbeddedBackend

    if load is None:
        from pipeline import load_generator as load
    return EmbeddedBackend(settings, DiskStore(settings.video_output_path), load, telemetry, clock)


def _service() -> Service:
    return current_app.extensions["video_diffusion"]


# --- routes -----------------------------------------------------------------------------------------

@api.post("/generate")
def generate():
    service = _service()
    mode = _requested_mode(service.settings.generate_mode)
    key = request.headers.get(idempotency.HEADER)
    if key is not None:
        return _generate_once(service, mode, idempotency.check_key(key))
    with service.backend.admission(mode):  # auth, draining and queue room before the body is read or decoded
        task = _submit(service, mode, _raw_params(), _read_image_bytes())
    return _respond(service, mode, task)


def _submit(service: Service, mode: str, raw: dict[str, str], data: bytes) -> Task:
    """Validate, decode and hand the task to the backend (the caller holds an admission place)."""
    generation = {k: v for k, v in raw.items() if k not in (*WEBHOOK_FIELDS, MODEL_FIELD)}
    model = service.served_model(raw.get(MODEL_FIELD, "").strip() or None)
    params = parse_params(generation, service.schema(model), max_output_frames=service.settings.max_output_frames,
                          defaults=model.defaults, served=model.name)
    webhook = _webhook(service, raw)
    image = open_image(data, service.settings.max_image_pixels)  # the header alone
    output_bytes = _output_bytes(service, model, params, image.size)  # 422s now, not a failed task
    with service.decodes, service.telemetry.decode.time():
        image = decode_image(image, service.settings.max_dimension)
    task = Task(task_id=new_task_id(), mode=mode, params=params, webhook=webhook,
                created_at=service.backend.clock.now(), output_bytes=output_bytes, owner=middleware.tenant(),
                model_name=model.name)
    if service.settings.result_cache and generation.get("seed", "").strip():  # a drawn seed is never repeated
        # Per tenant: a hit must not tell one API key that another made the same request.
        task.cache_key = cache_key(image, resolve_defaults(params, model.defaults, model.family),
                                   f"{service.model_identity(model)}|{task.owner or ''}")
    task = service.backend.submit(task, image)
    service.telemetry.cache_lookup(task)
    return task


def _output_bytes(service: Service, model: ModelInfo, params: dict, image_size: tuple[int, int]) -> int:
    """The video's frames in memory at their most, checked against MAX_OUTPUT_MB; the size as the task will make
    it (the model's defaults where the request leaves it, `sizing` applied to this image)."""
    defaults, settings = model.defaults, service.settings
    width, height = target_size(image_size, params["width"] or defaults.get("width", 1024),
                                params["height"] or defaults.get("height", 576), params["sizing"],
                                settings.max_dimension)
    values = {**params, "fps": params["fps"] or defaults.get("fps", 6)}
    return check_output_memory(values, params["num_frames"] or defaults.get("num_frames", 25), width, height,
                               settings.max_output_mb)


def _respond(service: Service, mode: str, task: Task, **headers: str):
    headers = {"X-Cache": "hit" if task.cached_from else "miss", **headers}
    if mode == "async":
        return status_response(task, 202, Location=url_for("api.status", task_id=task.task_id), **headers)
    response = video_response(_wait_for(task.task_id, keyed=idempotency.HEADER in request.headers))
    response.headers.update(headers)
    return response


def _generate_once(service: Service, mode: str, key: str):
    """`POST /generate` with an Idempotency-Key: the task the key's first request made, or a new one bound to it."""
    store, ttl, clock = service.backend.idempotency, service.settings.result_ttl, service.backend.clock
    name = idempotency.scoped(key, middleware.presented_key())
    existing = idempotency.live(store.get(name), ttl, clock.now())
    if existing is not None and existing.task_id is not None:
        print_ = idempotency.fingerprint(_read_image_bytes(), _raw_params())
        task_id = idempotency.settle(existing, print_)
        ended = (task := service.backend.get(task_id)) is not None and task.status.terminal
        if mode == "async" or ended:  # answered now: no wait, no place in line
            return _replay(service, mode, task_id)
        with service.backend.admission(mode):  # a replay that waits holds a place in line, as any waiting request
            return _replay(service, mode, task_id)
    with service.backend.admission(mode):
        raw, data = _raw_params(), _read_image_bytes()
        print_ = idempotency.fingerprint(data, raw)
        holder = store.claim(name, idempotency.Entry(print_, None, clock.now()), ttl)
        if holder is None:
            try:
                task = _submit(service, mode, raw, data)
            except BaseException:
                store.release(name)  # nothing was made: the same key may be tried again
                raise
            store.bind(name, idempotency.Entry(print_, task.task_id, clock.now()), ttl)
            return _respond(service, mode, task)
    return _replay(service, mode, _await_binding(store, name, holder, print_, ttl, clock))


def _await_binding(store, name: str, holder, print_: str, ttl: int, clock: Clock) -> str:
    """The task of a key another connection is submitting now: wait a little for it, then 409."""
    deadline = time.monotonic() + IDEMPOTENCY_WAIT
    while holder is not None and holder.task_id is None and holder.fingerprint == print_ \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        holder = idempotency.live(store.get(name), ttl, clock.now()) or holder
    return idempotency.settle(holder, print_)


def _replay(service: Service, mode: str, task_id: str):
    task = service.backend.get(task_id)
    if task is None:
        raise errors.NotFound("the task this Idempotency-Key made is gone")
    return _respond(service, mode, task, **{"Idempotent-Replayed": "true"})


def _webhook(service: Service, raw: dict[str, str]) -> dict | None:
    url, events = raw.get("webhook", "").strip(), raw.get("webhook_events", "").strip()
    if not url:
        if events:
            raise errors.InvalidParameter("`webhook_events` needs `webhook`", field="webhook_events")
        return None
    check_url(url, service.webhook_allow)
    # Where the body's status_url and result_url point: PUBLIC_URL, else the path prefix this request came under.
    root = service.settings.public_url or request.script_root
    return {"url": url, "events": parse_events(events), **({"root": root} if root else {})}


@api.get("/status/<path:task_id>")
def status(task_id: str):
    return status_response(_find(task_id), 200)


@api.get("/status/<task_id>/events")
def status_events(task_id: str):
    return event_stream(_find(task_id))


@api.get("/results/<path:task_id>")
def results(task_id: str):
    task = _find(task_id)
    if not task.status.terminal:
        return status_response(task, 202, **{"Retry-After": "2"})
    if task.status is not TaskStatus.FINISHED:
        raise errors.TaskDidNotFinish(f"the task {task.status.value}: {task.error['message']}",
                                      code=task.error["code"])
    return video_response(task)


@api.delete("/tasks/<path:task_id>")
def cancel(task_id: str):
    task = _find(task_id)
    if task.status.terminal:
        raise errors.AlreadyEnded(f"the task has already ended ({task.status.value})")
    task = _service().backend.cancel(task_id)
    return status_response(task, 200 if task.status.terminal else 202)


@api.get("/health")
def health():
    report = _service().backend.health()
    return jsonify(report.body()), 200 if report.ok else 503


@api.get("/livez")
def livez():
    return jsonify({"status": "alive"})


@api.get("/metrics")
def metrics():
    return generate_latest(_service().telemetry.registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


@api.get("/openapi.json")
def openapi():
    return jsonify(build_document(_service().schema(), root=request.script_root))


@api.get("/params")
def params():
    """The generation parameters as this deployment accepts them: what the web page builds its controls from."""
    service = _service()
    requested = request.args.get(MODEL_FIELD, "").strip() or None
    served = sorted(service.backend.served_models())
    try:
        model = service.served_model(requested)
    except errors.InvalidParameter:
        if requested:
            raise
        model = service.served_model(served[0])  # several and no default: the page shows the first, and a picker
    described = schema(service.schema(model))
    for item in described:  # what "decided by the model" means on this server now, for the page to show
        if item["default"] is None and item["name"] in model.defaults:
            item["effective_default"] = model.defaults[item["name"]]
    return jsonify({"params": described, "model": model.name, "family": model.family, "models": served or [model.name]})


@page.get("/")
def index():
    return page.send_static_file("index.html")


@page.get("/favicon.ico")
def favicon():
    return page.send_static_file("favicon.svg")


# --- request parsing --------------------------------------------------------------------------------

def _requested_mode(default: str) -> str:
    """`Prefer: respond-async` asks for a task id at once, `Prefer: wait` for the video (RFC 7240)."""
    preferences = {token.split("=")[0].strip().lower()
                   for token in request.headers.get("Prefer", "").replace(";", ",").split(",")}
    if "respond-async" in preferences:
        return "async"
    if "wait" in preferences:
        return "sync"
    return default


def _find(task_id: str) -> Task:
    """The task, or 404: unknown and malformed ids, and another tenant's tasks, get the same answer (ADMIN_API_KEY
    sees every task; tasks made before API keys were tenants have no owner and are everyone's)."""
    task = _service().backend.get(task_id) if is_task_id(task_id) else None
    if task is None or not (task.owner is None or task.owner == middleware.tenant() or middleware.sees_every_task()):
        raise errors.NotFound("no task with this id")
    return task


def _raw_params() -> dict[str, str]:
    """Parameters from the query string and form fields (a form field wins over the same query name)."""
    raw = {**request.args.to_dict(), **request.form.to_dict()}
    for name in IMAGE_FIELDS:
        if name in request.form:
            raise errors.MissingImage(f"`{name}` must be a file upload (curl -F {name}=@input.png)", field=name)
        raw.pop(name, None)
    return raw


def _read_image_bytes() -> bytes:
    if request.mimetype == "multipart/form-data":
        for name in IMAGE_FIELDS:
            if name in request.files:
                return request.files[name].read()
    elif request.mimetype in IMAGE_TYPES:
        return request.get_data(cache=False)
    elif request.mimetype not in ("", "application/x-www-form-urlencoded"):
        raise errors.UnsupportedMediaType(
            f"Content-Type {request.mimetype} is not accepted: send multipart/form-data with the image in field "
            f"`image`, or the image itself as the body with Content-Type {', '.join(IMAGE_TYPES)}")
    raise errors.MissingImage("no image: send it as multipart field `image` (or `file`), or as the request body "
                              f"with Content-Type {', '.join(IMAGE_TYPES)}", field="image")


# --- waiting -----------------------------------------------------------------------------------------

def _wait_for(task_id: str, keyed: bool = False) -> Task:
    """Wait for a synchronous task, up to SYNC_TIMEOUT. A client that hangs up gives up its place: its task is
    canceled `client_gone`, unless it sent an Idempotency-Key (`keyed`), with which it may come back for the
    video: then the task runs on (bounded by JOB_TIMEOUT). Either way the wait ends there."""
    service = _service()
    deadline = time.monotonic() + service.settings.sync_timeout
    links = {"task_id": task_id, "status_url": url_for("api.status", task_id=task_id),
             "result_url": url_for("api.results", task_id=task_id)}
    while True:
        try:
            task = service.backend.wait(task_id, min(WAIT_SLICE, max(0.0, deadline - time.monotonic())))
        except errors.BackendUnavailable as exc:  # the task may still run: say which, so a retry is no duplicate
            raise errors.BackendUnavailable(f"{exc.message}; the task may still run: fetch it from result_url",
                                            retry_after=exc.retry_after, details=links) from None
        if task.status.terminal:
            return task
        if time.monotonic() >= deadline:
            raise errors.SyncTimeout(
                f"no video within SYNC_TIMEOUT={service.settings.sync_timeout} s; the task goes on: fetch it later",
                details=links)
        if _client_disconnected():
            if keyed:
                log.info("client of task %s hung up; its Idempotency-Key keeps the task running for a retry", task_id)
            else:
                log.info("client of task %s hung up; canceling the task (client_gone)", task_id)
                service.backend.cancel(task_id, errors.ClientGone)
            raise errors.ClientGone("the client hung up before its video was ready")


def _client_disconnected() -> bool:
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # a closed socket, or one (TLS) that cannot peek: assume it is there
        return False


