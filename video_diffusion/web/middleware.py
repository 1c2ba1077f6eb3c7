"""What every request goes through: a request id, the API key, CORS, one access-log line, and JSON errors."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from http import HTTPStatus
from urllib.parse import urlsplit

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from video_diffusion import errors

log = logging.getLogger("video_diffusion.access")  # one line per request

PUBLIC_ENDPOINTS = {"api.health", "api.livez"}  # and the web page's files (blueprint "page")
QUIET_ENDPOINTS = {"api.health", "api.livez", "api.metrics", "page.static"}  # probed often: logged at debug
REQUEST_ID = re.compile(r"[\w.\-]{1,128}")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})  # RFC 9110
# The page previews uploads and plays results from blob: URLs; nothing is fetched from another origin.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: data:; connect-src 'self' blob:; "
               "object-src 'none'; "
               "frame-ancestors 'none'; base-uri 'self'; form-action 'self'")
EXPOSED_HEADERS = ("Content-Disposition, Location, Retry-After, Server-Timing, X-Model, X-Request-Id, X-Seed, X-Task-Id, "
                   "X-Cache, Idempotent-Replayed")


def init_app(app: Flask) -> None:
    app.before_request(_before_request)
    app.after_request(_after_request)
    app.register_error_handler(errors.ServiceError, service_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, _unexpected_error)


def _settings():
    return current_app.extensions["video_diffusion"].settings


def _before_request() -> None:
    given = request.headers.get("X-Request-Id", "")
    g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    g.started = time.perf_counter()
    _authorize()


def _authorize() -> None:
    settings = _settings()
    if not settings.api_key or request.method == "OPTIONS" or request.endpoint is None:
        return  # no keys; a CORS preflight (browsers send no credentials); or an unknown path (404)
    if request.endpoint in PUBLIC_ENDPOINTS or request.blueprint == "page":
        return
    if request.endpoint == "api.metrics" and settings.metrics_public:
        return
    if not key_accepted(settings, presented_key()):
        raise errors.Unauthorized(KEY_NEEDED)


KEY_NEEDED = "missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key`"


def key_accepted(settings, given: str) -> bool:
    """Whether `given` is one of the API keys (or the admin key): every key compared, in constant time. The API
    and a worker's metrics server both ask this."""
    matched = False
    for key in (*settings.api_key, *([settings.admin_api_key] if settings.admin_api_key else [])):
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


def tenant() -> str | None:
    """Who owns what this request makes: a digest of the API key it presented (never the key), None without keys."""
    if not _settings().api_key:
        return None
    return hashlib.sha256(b"video-diffusion tenant\0" + presented_key().encode()).hexdigest()[:32]


def sees_every_task() -> bool:
    """No keys set (one tenant), or the request presented ADMIN_API_KEY."""
    settings = _settings()
    admin = settings.admin_api_key
    return not settings.api_key or (admin is not None and hmac.compare_digest(presented_key().encode(),
                                                                               admin.encode()))


def presented_key() -> str:
    """The API key the client sent (`Authorization: Bearer` or `X-API-Key`), "" without one."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("X-API-Key", "")


def _after_request(response):
    service = current_app.extensions["video_diffusion"]
    response.status = _status_line(response.status_code)
    response.headers["X-Request-Id"] = g.get("request_id", "")
    response.headers["X-Content-Type-Options"] = "nosniff"
    if "Location" in response.headers and not g.get("absolute_location"):  # e.g. werkzeug's slash redirects:
        # never point at whatever `Host` said (a presigned result URL, the store's own, is kept as made)
        response.headers["Location"] = urlsplit(response.headers["Location"])._replace(scheme="", netloc="").geturl()
    if request.blueprint == "page":
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        response.headers["X-Frame-Options"] = "DENY"
    _add_cors_headers(response, service.settings.cors_origins)
    # Labels from closed sets only: made-up methods and paths must not grow /metrics.
    route = request.url_rule.rule if request.url_rule else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "other"
    status = "client_gone" if response.status_code == errors.ClientGone.status else str(response.status_code)
    service.telemetry.http.labels(method, route, status).inc()
    duration_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    level = logging.DEBUG if request.endpoint in QUIET_ENDPOINTS else logging.INFO
    log.log(level, "%s %s %s %.1f ms client=%s task=%s", request.method, request.path, status,
            duration_ms, request.remote_addr, response.headers.get("X-Task-Id", "-"),
            extra={"request_id": g.get("request_id"), "task_id": response.headers.get("X-Task-Id"),
                   "method": request.method, "path": request.path, "status": response.status_code,
                   "duration_ms": round(duration_ms, 1)})
    return response


def _status_line(code: int) -> str:
    """RFC 9110's reason phrase ("202 Accepted"), not werkzeug's capitals ("202 ACCEPTED")."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:  # e.g. 499, client_gone
        return f"{code} Client Closed Request" if code == errors.ClientGone.status else str(code)


def _add_cors_headers(response, origins) -> None:
    origin = request.headers.get("Origin")
    if not origins or not origin or ("*" not in origins and origin not in origins):
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    response.vary.add("Origin")
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, X-API-Key, Content-Type, Prefer, X-Request-Id, Idempotency-Key"
        response.headers["Access-Control-Max-Age"] = "600"


# --- errors -----------------------------------------------------------------------------------------

def service_error(exc: errors.ServiceError):
    response = jsonify(exc.to_dict())
    response.status_code = exc.status
    response.headers.update(exc.headers)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


_HTTP_CODES = {400: errors.BadRequest, 404: errors.NotFound, 405: errors.MethodNotAllowed,
               413: errors.PayloadTooLarge, 415: errors.UnsupportedMediaType}


def http_error(exc: HTTPException):
    """werkzeug's HTTP errors (404, 405, 413, ...) as the service's JSON errors, keeping their headers (`Allow`)."""
    if exc.code == 413:
        message = (f"the request is larger than MAX_UPLOAD_MB={_settings().max_upload_mb} MiB "
                   "or has too many form parts")
    elif exc.code == 405 and getattr(exc, "valid_methods", None):
        allowed = [m for m in exc.valid_methods if m not in ("HEAD", "OPTIONS")] or list(exc.valid_methods)
        message = f"{request.method} is not allowed here: use {' or '.join(sorted(allowed))}"
    else:
        message = exc.description or exc.name
    error_class = _HTTP_CODES.get(exc.code)
    if error_class is None:
        response = jsonify({"error": {"code": "http_error", "message": message}})
        response.status_code = exc.code
    else:
        response = service_error(error_class(message))
    for name, value in exc.get_headers():  # e.g. `Allow` on a 405
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _unexpected_error(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return service_error(errors.ServiceError("internal error; the server log has the details"))
