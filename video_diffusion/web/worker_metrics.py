"""A worker's own `/metrics` (its tasks, its GPU memory) and `/livez`, served beside RQ's work loop.

It binds `HOST`, takes the API key as the API does (unless `METRICS_PUBLIC`), answers GET and HEAD, and picks a
free port when `WORKER_METRICS_PORT` is 0 or already taken (a second worker on the host); the heartbeat names
the port. One connection at a time, each with a read timeout: a scrape target, not a web server.
"""

from __future__ import annotations

import errno
import logging
import socket
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from flask import Flask, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException

from config import Settings
from video_diffusion import errors
from video_diffusion.web.middleware import KEY_NEEDED, http_error, key_accepted, presented_key, service_error

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0  # seconds a connection may take to send its request


class _Handler(WSGIRequestHandler):
    timeout = READ_TIMEOUT

    def log_message(self, format, *args):  # scrapes every few seconds: not worth a line each
        pass


class MetricsServer(WSGIServer):
    """The standard library's WSGI server, on IPv4 or IPv6 as `HOST` says."""

    def __init__(self, host: str, port: int, app):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.set_app(app)

    def handle_error(self, request, client_address):  # a client that timed out or hung up: its loss
        log.debug("metrics request from %s failed", client_address[0], exc_info=True)


def metrics_app(settings: Settings, registry: CollectorRegistry) -> Flask:
    app = Flask("video_diffusion.worker_metrics")

    @app.before_request
    def authorize():
        if request.endpoint == "metrics" and settings.api_key and not settings.metrics_public \
                and not key_accepted(settings, presented_key()):
            raise errors.Unauthorized(KEY_NEEDED)

    @app.get("/metrics")  # Flask answers HEAD for a GET route
    def metrics():
        return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    @app.get("/livez")
    def livez():
        return jsonify(status="ok")

    app.register_error_handler(errors.ServiceError, service_error)  # the API's JSON errors, `Allow` kept
    app.register_error_handler(HTTPException, http_error)
    return app


def serve(settings: Settings, registry: CollectorRegistry) -> MetricsServer:
    """Bind the metrics server (not yet serving: call `serve_forever`); port 0 or a taken one: a free port."""
    app = metrics_app(settings, registry)
    try:
        return MetricsServer(settings.host, settings.worker_metrics_port, app)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or settings.worker_metrics_port == 0:
            raise
        log.warning("WORKER_METRICS_PORT=%d is taken (another worker on this host?); metrics on a free port",
                    settings.worker_metrics_port)
        return MetricsServer(settings.host, 0, app)
