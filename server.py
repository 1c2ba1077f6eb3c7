"""The HTTP service: requests in, validated tasks to the backend, videos and JSON out."""

from __future__ import annotations

import io
import logging
import select
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request, send_file, url_for
from PIL import Image
from werkzeug.exceptions import HTTPException

import errors
from config import Settings, load_settings
from embedded import EmbeddedBackend
from images import load_image
from params import parse_params
from tasks import Task, TaskStatus, TaskStore, is_task_id, new_task_id

log = logging.getLogger(__name__)
api = Blueprint("api", __name__)

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
IMAGE_FIELDS = ("image", "file")
WAIT_SLICE = 0.5  # seconds between checks that a synchronous client is still connected


@dataclass
class Service:
    settings: Settings
    backend: Any  # EmbeddedBackend or RedisBackend


def create_app(settings: Settings | None = None, *, backend=None, load=None) -> Flask:
    """The Flask app. `backend` and `load` (Settings -> VideoGenerator) are for tests to inject."""
    settings = settings or load_settings()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024, MAX_FORM_PARTS=64,
                      MAX_FORM_MEMORY_SIZE=1024 * 1024)
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's decompression-bomb guard
    if backend is None and settings.redis:
        from redis_backend import RedisBackend  # the API of a Redis deployment holds no model

        backend = RedisBackend(settings)
    elif backend is None:
        if load is None:
            from pipeline import load_generator as load
        backend = EmbeddedBackend(settings, TaskStore(settings.video_output_path), load)
        backend.start()
    app.extensions["video_diffusion"] = Service(settings, backend)
    app.register_blueprint(api)
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
    params = parse_params(_raw_params())
    image = load_image(_read_image_bytes(), service.settings.max_image_pixels)
    mode = _requested_mode(service.settings.generate_mode)
    task = service.backend.submit(Task(task_id=new_task_id(), mode=mode, params=params), image)
    if mode == "async":
        return _status_response(task, 202, Location=url_for("api.status", task_id=task.task_id))
    return _video_response(_wait_for(task.task_id))


@api.get("/status/<path:task_id>")
def status(task_id: str):
    return _status_response(_find(task_id), 200)


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
    info = _service().backend.health()
    return jsonify(info), 200 if info["status"] == "ok" else 503


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
    """Wait for a synchronous task; a client that hangs up gives up its place (its task is canceled)."""
    backend = _service().backend
    while True:
        task = backend.wait(task_id, WAIT_SLICE)
        if task.status.terminal:
            return task
        if _client_disconnected():
            log.info("client of task %s hung up; canceling it", task_id)
            backend.cancel(task_id)


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
    """The task as clients see it, from `/status`, a 202 `/results`, `DELETE /tasks` and async submission."""
    body = {
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
    response = jsonify(body)
    response.status_code = status_code
    response.headers.update({"X-Task-Id": task.task_id, **headers})
    return response


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
        return jsonify({"error": {"code": "http_error", "message": message}}), exc.code
    return _service_error(error_class(message))


def _unexpected_error(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return _service_error(errors.ServiceError("internal error; the server log has the details"))
