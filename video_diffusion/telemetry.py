"""Metrics (Prometheus, on an injected registry) and logs (text or JSON), for the API and the workers."""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from video_diffusion.lifecycle.record import Task, TaskStatus

log = logging.getLogger("video_diffusion.tasks")  # one line per task event, whichever process
PREFIX = "video_diffusion"
_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class Telemetry:
    """Counts and times tasks and HTTP requests, and logs one line per task transition."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.created = Counter(f"{PREFIX}_tasks_created", "Tasks accepted, by mode (sync, async).", ["mode"],
                               registry=r)
        self.completed = Counter(f"{PREFIX}_tasks_completed", "Tasks that finished with a video.", registry=r)
        self.failed = Counter(f"{PREFIX}_tasks_failed", "Tasks that failed, by error code.", ["code"], registry=r)
        self.canceled = Counter(f"{PREFIX}_tasks_canceled", "Tasks canceled before they finished.", registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time from submission to start.",
                                    buckets=_SECONDS_BUCKETS, registry=r)
        self.generation = Histogram(f"{PREFIX}_generation_seconds", "Time generating frames (denoise + decode).",
                                    buckets=_SECONDS_BUCKETS, registry=r)
        self.encoding = Histogram(f"{PREFIX}_encoding_seconds", "Time encoding frames into a video file.",
                                  buckets=_SECONDS_BUCKETS, registry=r)
        self.decode = Histogram(f"{PREFIX}_image_decode_seconds", "Time decoding an upload (after admission).",
                                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.result_cache = Counter(f"{PREFIX}_result_cache", "Submissions naming a seed, by whether an earlier "
                                    "video answered them (hit) or they were generated (miss).", ["outcome"],
                                    registry=r)
        self.webhooks = Counter(f"{PREFIX}_webhook_deliveries", "Webhook attempts by outcome: delivered, retried "
                                "(failed, tried again later) or dropped (refused, redirected or out of attempts).",
                                ["outcome"], registry=r)
        self.http = Counter(f"{PREFIX}_http_requests", "HTTP requests, by method, route and status.",
                            ["method", "route", "status"], registry=r)

    def watch(self, backend) -> None:
        """Report the backend's live state (queue depth, running, model ready, workers, GPU memory) at scrape."""
        self.registry.register(_BackendCollector(backend))

    def task_created(self, task: Task) -> None:
        self.created.labels(task.mode).inc()
        log.info("task %s queued (%s)", task.task_id, task.mode, extra={"task_id": task.task_id})

    def cache_lookup(self, task: Task) -> None:
        if task.cache_key:
            self.result_cache.labels("hit" if task.cached_from else "miss").inc()
        if task.cached_from:
            log.info("task %s answered with the video of task %s (result cache)", task.task_id, task.cached_from,
                     extra={"task_id": task.task_id})

    def task_started(self, task: Task) -> None:
        wait = task.timings.get("queue_wait", 0.0)
        self.queue_wait.observe(wait)
        log.info("task %s started after %.2f s in line", task.task_id, wait, extra={"task_id": task.task_id})

    def task_ended(self, task: Task) -> None:
        timings = task.timings
        if task.status is TaskStatus.FINISHED:
            self.completed.inc()
            self.generation.observe(timings["generation"])
            self.encoding.observe(timings["encoding"])
        elif task.status is TaskStatus.CANCELED:
            self.canceled.inc()
        else:
            self.failed.labels(task.error["code"]).inc()
        detail = ", ".join(f"{name} {value:.2f} s" for name, value in timings.items())
        code = f" ({task.error['code']})" if task.error else ""
        log.info("task %s %s%s: %s", task.task_id, task.status.value, code, detail or "never ran",
                 extra={"task_id": task.task_id})


class _BackendCollector:
    """Gauges read from the backend at scrape time, so they are never stale."""

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        state = self.backend.metrics()
        for name, help_text in (("queue_depth", "Tasks waiting to run."), ("tasks_running", "Tasks running now."),
                                ("model_ready", "1 when a model is loaded and taking tasks."),
                                ("workers_live", "Redis mode: workers with a fresh heartbeat."),
                                ("webhooks_pending", "Webhook deliveries in the outbox: being sent, or due again."),
                                ("storage_stored_bytes", "Bytes of inputs and videos in the data folder."),
                                ("storage_reserved_bytes", "Bytes held for admitted tasks' files not written yet."),
                                ("storage_free_bytes", "Free bytes on the data folder's disk."),
                                ("gpu_memory_allocated_bytes", "CUDA memory allocated by tensors."),
                                ("gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator."),
                                ("gpu_memory_peak_bytes", "Peak CUDA memory allocated since start.")):
            if name in state:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=state[name])

    def describe(self):
        return []


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
                 "message": record.getMessage()}
        for key in ("request_id", "task_id", "method", "path", "status", "duration_ms"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} request_id={request_id}" if request_id else line


def configure_logging(level: str, fmt: str) -> None:
    """Send our logs to stderr in `fmt` (text or json), once per process."""
    root = logging.getLogger()
    if any(getattr(h, "_video_diffusion", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._video_diffusion = True
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
