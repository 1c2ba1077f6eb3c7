"""gunicorn settings, from the same Settings as the app.

One worker process (it holds the one pipeline) with threads for I/O. No preload: the model loads in the
worker after the fork, since CUDA (and multithreaded torch) do not survive a fork.

What would stop the service at start is checked here, in the master, and said in one line: a bad setting, a
data folder another instance owns, or one that cannot be written.
"""

import errno
import os
import signal
import socket
import sys
import threading

from config import ConfigError, load_settings
from video_diffusion.backends.blobs import StoreUnusable
from video_diffusion.backends.blobs import check_at_start as check_result_store
from video_diffusion.backends.disk_store import FolderInUse, FolderUnusable, probe_folder



def _probe_port(host: str, port: int) -> None:
    """Say in one line that the port is taken, instead of gunicorn's five retries and a traceback."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise ConfigError(f"PORT={port}: address already in use (another `make run`?). Pick another port: "
                              f"PORT={port + 1} make run, with its own VIDEO_OUTPUT_PATH if the first one keeps "
                              "running") from None


try:
    _settings = load_settings()
    _probe_port(_settings.host, _settings.port)
    if not _settings.redis:
        probe_folder(_settings.video_output_path)  # the worker takes the lock for good; this only asks
    else:
        check_result_store(_settings)
except (ConfigError, FolderInUse, FolderUnusable, StoreUnusable) as _exc:
    print(f"video-diffusion: {_exc}", file=sys.stderr)
    sys.exit(2)

wsgi_app = "server:create_app()"
bind = f"{_settings.host}:{_settings.port}"
workers = 1
# gthread, with a front that receives each whole request before it takes a thread (front.py).
worker_class = "video_diffusion.web.front.FrontWorker"
# Threads for requests already received: every waiting synchronous request and the running one, every event
# stream, and spares for quick answers. Probes (/health, /livez, /metrics) have a pool of their own.
threads = _settings.max_queue + 1 + _settings.max_event_streams + 4
preload_app = False
timeout = 120  # worker heartbeat: the generation runs in its own thread, so long jobs don't trip it
# SIGTERM: the running generation may take up to JOB_TIMEOUT to finish; then gunicorn's own wind-down.
graceful_timeout = _settings.job_timeout + 30
accesslog = None  # the app logs one line per request, with its request id
# No control socket: gunicorn's default is one path per user (~/.gunicorn/gunicorn.ctl) shared by every instance.
control_socket_disable = True


def when_ready(server):
    """Ctrl-C (SIGINT) in the master drains like SIGTERM, said in one line; a second Ctrl-C stops the workers now.
    (gunicorn's own SIGINT is a quick shutdown: the port closed at once, the running task cut off mid-step.)"""
    interrupts = []

    def on_interrupt(signum, frame):
        interrupts.append(signum)
        if len(interrupts) == 1:
            print("video-diffusion: finishing the running task; Ctrl-C again to stop now", file=sys.stderr,
                  flush=True)
            server.signal(signal.SIGTERM, frame)  # the graceful stop, as `kill` asks for it
        else:
            for pid in list(server.WORKERS):
                try:
                    os.kill(pid, signal.SIGINT)  # a worker already draining stops now on its next SIGINT
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGINT, on_interrupt)


def post_worker_init(worker):
    """On SIGTERM (or a first Ctrl-C), drain first (health 503, new work refused, running task finishes), then stop
    as usual. A SIGINT while draining stops now: the running task is recorded `interrupted`, no traceback."""
    stop = worker.handle_exit
    draining = threading.Event()

    def drain_then_stop(signum, frame):
        if draining.is_set():
            return
        draining.set()

        def run():
            try:
                worker.wsgi.extensions["video_diffusion"].drain()
            finally:
                stop(signum, frame)

        threading.Thread(target=run, name="drain", daemon=True).start()

    def on_interrupt(signum, frame):
        if not draining.is_set():
            drain_then_stop(signum, frame)
            return
        # Stopping now: a further SIGINT (the terminal's and the master's forward of the same Ctrl-C) must not
        # re-enter this handler half-way through writing the running task down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            worker.wsgi.extensions["video_diffusion"].interrupt()
        finally:
            os._exit(0)  # at once: no interpreter teardown under torch's running threads (that aborted before)

    signal.signal(signal.SIGTERM, drain_then_stop)
    signal.signal(signal.SIGINT, on_interrupt)
