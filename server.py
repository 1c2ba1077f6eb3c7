"""The HTTP service: requests in, validated tasks to the backend, videos and JSON out."""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import select
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, send_file, stream_with_context, url_for
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

import errors
from config import Settings, load_settings
from embedded import EmbeddedBackend
from images import load_image, target_size
from openapi import build_document
from params import capped, parse_params, schema
from tasks import Task, TaskStatus, TaskStore, is_task_id, new_task_id
from telemetry import Telemetry, configure_logging

log = logging.getLogger(__name__)
api = Blueprint("api", __name__)
page = Blueprint("page", __name__, static_folder="static", static_url_path="/static")

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
IMAGE_FIELDS = ("image", "file")
WAIT_SLICE = 0.5  # seconds between checks that a synchronous client is still connected
PUBLIC_ENDPOINTS = {"api.health", "api.livez"}  # and the web page's files (blueprint "page")
EVENT_INTERVAL = 0.25  # seconds between checks of a task followed by /status/<id>/events
EVENT_KEEPALIVE = 15.0  # seconds between comment lines that keep proxies from closing an idle stream
QUIET_ENDPOINTS = {"api.health", "api.livez", "api.metrics", "page.static"}  # probed every few seconds: logged at debug
REQUEST_ID = re.compile(r"[\w.\-]{1,128}")
EXPOSED_HEADERS = "Content-Disposition, Location, Retry-After, Server-Timing, X-Model, X-Request-Id, X-Seed, X-Task-Id"


class Service:
    """What the routes share: settings, the backend, telemetry, the parameter schema and the drain state."""

    def __init__(self, settings: Settings, backend, telemetry: Telemetry):
        self.settings = settings
        self.backend = backend
        self.telemetry = telemetry
        self.params = capped(settings.max_dimension, settings.max_steps)
        self.draining = threading.Event()

    def drain(self) -> None:
        """On SIGTERM: refuse new work, let the running task finish, keep queued async tasks for the next start."""
        self.draining.set()
        log.info("draining: /health answers 503, new submissions are refused")
        self.backend.drain(self.settings.job_timeout)


def create_app(settings: Settings | None = None, *, backend=None, load=None,
               telemetry: Telemetry | None = None) -> Flask:
    """The Flask app. `backend`, `load` (Settings -> VideoGenerator) and `telemetry` are for tests to inject."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    telemetry = telemetry or Telemetry()
    app = Flask(__name__, static_folder=None)  # the page blueprint serves the files, publicly
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024, MAX_FORM_PARTS=64,
                      MAX_FORM_MEMORY_SIZE=1024 * 1024)
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's decompression-bomb guard
    if backend is None and settings.redis:
        from redis_backend import RedisBackend  # the API of a Redis deployment holds no model

        backend = RedisBackend(settings, telemetry=telemetry)
    elif backend is None:
        if load is None:
            from pipeline import load_generator as load
        backend = EmbeddedBackend(settings, TaskStore(settings.video_output_path), load, telemetry)
        backend.start()
    telemetry.watch(backend)
    if settings.trusted_proxies:
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops, x_prefix=hops)
    app.extensions["video_diffusion"] = Service(settings, backend, telemetry)
    app.register_blueprint(api)
    app.register_blueprint(page)
    app.before_request(_before_request)
    app.after_request(_after_request)
    app.register_error_handler(errors.ServiceError, _service_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _service() -> Service:
    return current_app.extensions["video_diffusion"]


# --- routes -----------------------------------------------------------------------------------------

@api.post("/generate")
def generate():
    service = _service()
    if service.draining.is_set():
        raise errors.ShuttingDown("the service is shutting down; try again shortly", retry_after=10)
    params = parse_params(_raw_params(), service.params)
    image = load_image(_read_image_bytes(), service.settings.max_image_pixels)
    if params["sizing"] == "source":
        target_size(image.size, 0, 0, "source", service.settings.max_dimension)  # 422 now, not a failed task
    mode = _requested_mode(service.settings.generate_mode)
    task = service.backend.submit(Task(task_id=new_task_id(), mode=mode, params=params), image)
    if mode == "async":
        return _status_response(task, 202, Location=url_for("api.status", task_id=task.task_id))
    return _video_response(_wait_for(task.task_id))


@api.get("/status/<path:task_id>")
def status(task_id: str):
    return _status_response(_find(task_id), 200)


@api.get("/status/<task_id>/events")
def status_events(task_id: str):
    """Server-Sent Events: one `status` event per change of the task, until it ends (`curl -N` reads it)."""
    task = _find(task_id)
    backend = _service().backend

    def events():
        last, idle = None, 0.0
        current = task
        while True:
            body = _status_body(current)
            if body != last:
                yield f"event: status\ndata: {json.dumps(body)}\n\n"
                last, idle = body, 0.0
            if current.status.terminal:
                return
            time.sleep(EVENT_INTERVAL)
            idle += EVENT_INTERVAL
            if idle >= EVENT_KEEPALIVE:
                yield ": keep-alive\n\n"
                idle = 0.0
            current = backend.get(task_id) or current

    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Task-Id": task.task_id})


@api.get("/results/<path:task_id>")
def results(task_id: str):
    task = _find(task_id)
    if not task.status.terminal:
        return _status_response(task, 202, **{"Retry-After": "2"})
    if task.status is not TaskStatus.FINISHED:
        raise errors.TaskDidNotFinish(f"the task {task.status.value}: {task.error['message']}",
                                      code=task.error["code"])
    return _video_response(task)


@api.delete("/tasks/<path:task_id>")
def cancel(task_id: str):
    task = _find(task_id)
    if task.status.terminal:
        raise errors.AlreadyEnded(f"the task has already ended ({task.status.value})")
    task = _service().backend.cancel(task_id)
    return _status_response(task, 200 if task.status.terminal else 202)


@api.get("/health")
def health():
    service = _service()
    info = service.backend.health()
    if service.draining.is_set():
        info["status"] = "draining"
    return jsonify(info), 200 if info["status"] == "ok" else 503


@api.get("/livez")
def livez():
    return jsonify({"status": "alive"})


@api.get("/metrics")
def metrics():
    return generate_latest(_service().telemetry.registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


@api.get("/openapi.json")
def openapi():
    return jsonify(build_document(_service().params))


@api.get("/params")
def params():
    """The generation parameters as this deployment accepts them: what the web page builds its controls from."""
    return jsonify({"params": schema(_service().params)})


@page.get("/")
def index():
    return page.send_static_file("index.html")


# --- every request ----------------------------------------------------------------------------------

def _before_request() -> None:
    given = request.headers.get("X-Request-Id", "")
    g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    g.started = time.perf_counter()
    _authorize()


def _authorize() -> None:
    settings = _service().settings
    if not settings.api_key or request.method == "OPTIONS" or request.endpoint is None:
        return  # no keys; a CORS preflight (browsers send no credentials); or an unknown path (404)
    if request.endpoint in PUBLIC_ENDPOINTS or request.blueprint == "page":
        return
    if request.endpoint == "api.metrics" and settings.metrics_public:
        return
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("X-API-Key", "")
    matched = False
    for key in settings.api_key:  # every key is compared, in constant time
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not matched:
        raise errors.Unauthorized("missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key`")


def _after_request(response):
    service = _service()
    response.headers["X-Request-Id"] = g.get("request_id", "")
    _add_cors_headers(response, service.settings.cors_origins)
    route = request.url_rule.rule if request.url_rule else "unmatched"
    service.telemetry.http.labels(request.method, route, str(response.status_code)).inc()
    duration_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    level = logging.DEBUG if request.endpoint in QUIET_ENDPOINTS else logging.INFO
    log.log(level, "%s %s %s %.1f ms client=%s task=%s", request.method, request.path, response.status_code,
            duration_ms, request.remote_addr, response.headers.get("X-Task-Id", "-"),
            extra={"request_id": g.get("request_id"), "task_id": response.headers.get("X-Task-Id"),
                   "method": request.method, "path": request.path, "status": response.status_code,
                   "duration_ms": round(duration_ms, 1)})
    return response


def _add_cors_headers(response, origins) -> None:
    origin = request.headers.get("Origin")
    if not origins or not origin or ("*" not in origins and origin not in origins):
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    response.vary.add("Origin")
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, X-API-Key, Content-Type, Prefer, X-Request-Id"
        response.headers["Access-Control-Max-Age"] = "600"


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
    """The task, or 404: unknown and malformed ids get the same answer."""
    task = _service().backend.get(task_id) if is_task_id(task_id) else None
    if task is None:
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


# --- responses --------------------------------------------------------------------------------------

def _wait_for(task_id: str) -> Task:
    """Wait for a synchronous task, up to SYNC_TIMEOUT; a client that hangs up gives up its place."""
    service = _service()
    deadline = time.monotonic() + service.settings.sync_timeout
    while True:
        task = service.backend.wait(task_id, min(WAIT_SLICE, max(0.0, deadline - time.monotonic())))
        if task.status.terminal:
            return task
        if time.monotonic() >= deadline:
            raise errors.SyncTimeout(
                f"no video within SYNC_TIMEOUT={service.settings.sync_timeout} s; the task goes on: fetch it later",
                details={"task_id": task_id, "status_url": url_for("api.status", task_id=task_id),
                         "result_url": url_for("api.results", task_id=task_id)})
        if _client_disconnected():
            log.info("client of task %s hung up; canceling it", task_id)
            service.backend.cancel(task_id)


def _client_disconnected() -> bool:
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # a closed socket, or one (TLS) that cannot peek: assume it is there
        return False


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def _status_response(task: Task, status_code: int, **headers: str):
    """The task as JSON, from `/status`, a 202 `/results`, `DELETE /tasks` and async submission."""
    response = jsonify(_status_body(task))
    response.status_code = status_code
    response.headers.update({"X-Task-Id": task.task_id, **headers})
    return response


def _status_body(task: Task) -> dict:
    """The task as clients see it."""
    return {
        "task_id": task.task_id, "status": task.status.value, "mode": task.mode,
        "progress": {"phase": task.phase, "step": task.step, "total": task.total_steps},
        "queue_position": _service().backend.queue_position(task.task_id)
        if task.status is TaskStatus.QUEUED else None,
        "created_at": _iso(task.created_at), "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
        "seed": task.params["seed"], "params": task.params, "model": task.model, "timings": task.timings,
        "error": task.error, "expired": task.expired,
        "status_url": url_for("api.status", task_id=task.task_id),
        "result_url": url_for("api.results", task_id=task.task_id)
        if task.status is TaskStatus.FINISHED and not task.expired else None,
    }


def _video_response(task: Task):
    if task.status is not TaskStatus.FINISHED:
        raise errors.from_code(task.error["code"], task.error["message"])
    video = None if task.expired else _service().backend.result(task)
    if video is None:
        raise errors.ResultExpired(f"the video was deleted RESULT_TTL={_service().settings.result_ttl} s after it "
                                   "was made")
    if isinstance(video, bytes):
        video = io.BytesIO(video)
    response = send_file(video, mimetype=task.result["content_type"], as_attachment=True,
                         download_name=task.result["filename"], max_age=0)
    timings = task.timings
    response.headers.update({
        "X-Task-Id": task.task_id,
        "X-Seed": str(task.params["seed"]),
        "X-Model": task.model,
        "Server-Timing": ", ".join(f"{name};dur={timings.get(key, 0) * 1000:.1f}" for name, key in
                                   (("queue", "queue_wait"), ("generate", "generation"), ("encode", "encoding"))),
    })
    return response


# --- errors -----------------------------------------------------------------------------------------

def _service_error(exc: errors.ServiceError):
    response = jsonify(exc.to_dict())
    response.status_code = exc.status
    response.headers.update(exc.headers)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


_HTTP_CODES = {400: errors.BadRequest, 404: errors.NotFound, 405: errors.MethodNotAllowed,
               413: errors.PayloadTooLarge, 415: errors.UnsupportedMediaType}


def _http_error(exc: HTTPException):
    if exc.code == 413:
        message = (f"the request is larger than MAX_UPLOAD_MB={_service().settings.max_upload_mb} MiB "
                   "or has too many form parts")
    else:
        message = exc.description or exc.name
    error_class = _HTTP_CODES.get(exc.code)
    if error_class is None:
        response = jsonify({"error": {"code": "http_error", "message": message}})
        response.status_code = exc.code
    else:
        response = _service_error(error_class(message))
    for name, value in exc.get_headers():  # e.g. `Allow` on a 405
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _unexpected_error(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return _service_error(errors.ServiceError("internal error; the server log has the details"))
