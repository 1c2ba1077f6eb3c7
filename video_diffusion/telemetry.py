"""Metrics (Prometheus, on an injected registry) and logs (text or JSON), for the API and the workers."""

from __future__ import annotations

import json
import logging
import time

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from video_diffusion.lifecycle.record import Task, TaskStatus

log = logging.getLogger("video_diffusion.tasks")  # one line per task event, whichever process
PREFIX = "video_diffusion"
_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# A counter's `_created` series doubles every target's series for nothing a dashboard uses.
disable_created_metrics()

# The task outcomes and durations: counted by each process and, in Redis mode, by the cluster (`tally`).
_COUNTS = {"completed": "Tasks that finished with a video.", "failed": "Tasks that failed, by error code.",
           "canceled": "Tasks canceled before they finished."}
_DURATIONS = {"queue_wait": "Time from submission to start.",
              "generation": "Time generating frames (denoise + decode).",
              "encoding": "Time encoding frames into a video file."}


class Telemetry:
    """Counts and times tasks and HTTP requests, and logs one line per task transition."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._cluster: _ClusterCollector | None = None
        r = self.registry
        self.created = Counter(f"{PREFIX}_tasks_created", "Tasks accepted, by mode (sync, async).", ["mode"],
                               registry=r)
        self.completed = Counter(f"{PREFIX}_tasks_completed", _COUNTS["completed"], registry=r)
        self.failed = Counter(f"{PREFIX}_tasks_failed", _COUNTS["failed"], ["code"], registry=r)
        self.canceled = Counter(f"{PREFIX}_tasks_canceled", _COUNTS["canceled"], registry=r)
        self.queue_wait, self.generation, self.encoding = (
            Histogram(f"{PREFIX}_{name}_seconds", _DURATIONS[name], buckets=_SECONDS_BUCKETS, registry=r)
            for name in ("queue_wait", "generation", "encoding"))
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

    def report_cluster(self, read: Callable[[], dict[str, float] | None]) -> None:
        """Redis mode, in the API: the task outcomes and durations at scrape are the whole deployment's, as `read`
        returns them (the sums `tally` adds with each change of status; None while unreadable), not this
        process's. One scrape target then shows every worker's work."""
        if self._cluster is not None:
            self._cluster.read = read
            return
        self._cluster = _ClusterCollector(read)
        for metric in (self.completed, self.failed, self.canceled, self.queue_wait, self.generation, self.encoding):
            self.registry.unregister(metric)
        self.registry.register(self._cluster)

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


def tally(task: Task) -> dict[str, float]:
    """What `task`'s change into its present status adds to the cluster's counts: `completed`, `canceled`,
    `failed|<code>`, and for each duration `<name>|<bucket>` and `<name>|sum`. Redis mode applies
    it in the same step as the change itself, whichever process makes it, so the counts match the records."""
    fields: dict[str, float] = {}

    def observe(name: str, seconds: float) -> None:
        bucket = next((floatToGoString(b) for b in _SECONDS_BUCKETS if seconds <= b), "+Inf")
        fields.update({f"{name}|{bucket}": 1, f"{name}|sum": seconds})

    if task.status is TaskStatus.STARTED:
        observe("queue_wait", task.timings.get("queue_wait", 0.0))
    elif task.status is TaskStatus.FINISHED:
        fields["completed"] = 1
        observe("generation", task.timings.get("generation", 0.0))
        observe("encoding", task.timings.get("encoding", 0.0))
    elif task.status is TaskStatus.CANCELED:
        fields["canceled"] = 1
    elif task.status is TaskStatus.FAILED:
        fields[f"failed|{(task.error or {}).get('code', 'unknown')}"] = 1
    return fields


class _ClusterCollector:
    """The cluster's task outcomes and durations from the sums `tally` kept (nothing while they are unreadable:
    a missing sample, not a drop to zero that would read as a counter reset)."""

    def __init__(self, read: Callable[[], dict[str, float] | None]):
        self.read = read

    def collect(self):
        stats = self.read()
        if stats is None:
            return
        for name in ("completed", "canceled"):
            yield CounterMetricFamily(f"{PREFIX}_tasks_{name}", _COUNTS[name], value=stats.get(name, 0.0))
        failed = CounterMetricFamily(f"{PREFIX}_tasks_failed", _COUNTS["failed"], labels=["code"])
        for field, value in sorted(stats.items()):
            if field.startswith("failed|"):
                failed.add_metric([field.split("|", 1)[1]], value)
        yield failed
        for name, help_text in _DURATIONS.items():
            total, buckets = 0.0, []
            for bound in (*(floatToGoString(b) for b in _SECONDS_BUCKETS), "+Inf"):
                total += stats.get(f"{name}|{bound}", 0.0)
                buckets.append((bound, total))
            yield HistogramMetricFamily(f"{PREFIX}_{name}_seconds", help_text, buckets=buckets,
                                        sum_value=stats.get(f"{name}|sum", 0.0))

    def describe(self):
        return []


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
