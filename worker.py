"""An RQ worker for the Redis mode: `python worker.py`. Start one per GPU, on any machine that reaches Redis.

It loads the pipeline once, then runs jobs in its own process (RQ's SimpleWorker: CUDA does not survive the
fork RQ's default worker makes per job). SIGTERM lets the running job finish first.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from rq import SimpleWorker

from config import ConfigError, load_settings
from video_diffusion.backends.blobs import StoreUnusable
from video_diffusion.backends.blobs import check_at_start as check_result_store
from video_diffusion.backends.redis_store import QUEUE_NAME, REDIS_ERRORS, connect, queue_name
from video_diffusion.backends.redis_worker import WorkerRuntime, install_runtime
from video_diffusion.lifecycle.record import ModelState
from video_diffusion.telemetry import Telemetry, configure_logging
from video_diffusion.web import worker_metrics

log = logging.getLogger("worker")


class _Worker(SimpleWorker):
    """RQ's SimpleWorker that also tells `main` a stop was asked for (RQ handles SIGTERM inside `work`)."""

    stop_requested: threading.Event

    def handle_warm_shutdown_request(self):
        self.stop_requested.set()
        super().handle_warm_shutdown_request()


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"worker.py: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if not settings.redis:
        print("worker.py: set REDIS_URL (or REDIS_HOST and REDIS_PORT)", file=sys.stderr)
        return 2
    try:
        check_result_store(settings)
    except StoreUnusable as exc:
        print(f"worker.py: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # until RQ installs its own, in work()
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    from pipeline import load_generator

    telemetry = Telemetry()
    runtime = WorkerRuntime(settings, telemetry)
    telemetry.watch(runtime)
    try:
        metrics = worker_metrics.serve(settings, telemetry.registry)
    except OSError as exc:  # HOST not an address of this machine: serving jobs matters more than metrics
        log.error("no metrics: cannot bind %s:%d: %s", settings.host, settings.worker_metrics_port, exc)
    else:
        runtime.serve_metrics(metrics)
        log.info("metrics on %s port %d", settings.host, metrics.server_port)
    install_runtime(runtime)
    runtime.start_heartbeat()
    runtime.load(load_generator)
    try:
        if runtime.state is not ModelState.READY:
            log.error("not taking jobs: %s", runtime.error)
            stop.wait()  # stay up and visible in /health rather than crash-loop
            return 1
        log.info("worker %s ready: %s on %s", runtime.name, runtime.generator.model.label, runtime.generator.device)
        _work(runtime, stop)
    finally:
        runtime.stop()
    return 0


def _work(runtime: WorkerRuntime, stop: threading.Event) -> None:
    """Run RQ's work loop; when Redis goes away, RQ's loop ends, so start another when it is back."""
    delay = 1.0
    connection = connect(runtime.settings.redis, blocking=True)  # RQ blocks on the queue for minutes
    while not stop.is_set():
        try:
            # Its own model's jobs first, then those of tasks an older API queued naming no model.
            worker = _Worker([queue_name(runtime.generator.model.name), QUEUE_NAME], connection=connection)
            worker.stop_requested = stop
            runtime.rq_worker = worker.name  # the heartbeat names it before RQ can give it a job
            runtime.beat()
            worker.work(logging_level=runtime.settings.log_level.upper())
            delay = 1.0
        except REDIS_ERRORS as exc:
            log.warning("Redis unreachable (%s); retrying in %.0f s", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)


if __name__ == "__main__":
    sys.exit(main())
