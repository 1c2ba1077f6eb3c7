"""The service's errors: each has an HTTP status and a stable machine code."""

from __future__ import annotations


class ServiceError(Exception):
    """An error a client may see: rendered as JSON `{"error": {"code", "message", "field"?}}`."""

    status = 500
    code = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, message: str, field: str | None = None, retry_after: int | None = None,
                 code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.details = details or {}
        if code:
            self.code = code

    def to_dict(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return {"error": body, **self.details}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class MissingImage(ServiceError):
    status, code = 400, "missing_image"


class InvalidImage(ServiceError):
    status, code = 400, "invalid_image"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="video-diffusion"'}


class NotFound(ServiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class AlreadyEnded(ServiceError):
    status, code = 409, "already_ended"


class TaskDidNotFinish(ServiceError):
    """GET /results of a failed or canceled task: the code is the task's own (e.g. `out_of_memory`)."""

    status, code = 409, "task_failed"


class ResultExpired(ServiceError):
    status, code = 410, "expired"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    status, code = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class UnknownParameter(ServiceError):
    status, code = 422, "unknown_parameter"


class ModelNotReady(ServiceError):
    status, code = 503, "model_not_ready"


class BackendUnavailable(ServiceError):
    status, code = 503, "redis_unavailable"


class ShuttingDown(ServiceError):
    status, code = 503, "shutting_down"


class QueueTimeout(ServiceError):
    """The task waited longer than QUEUE_TIMEOUT and never ran."""

    status, code = 503, "queue_timeout"


class Interrupted(ServiceError):
    """The service stopped while the task ran."""

    status, code = 503, "interrupted"


class WorkerLost(ServiceError):
    """The worker running the task was killed or lost (Redis mode)."""

    status, code = 503, "abandoned"


class TooManyStreams(ServiceError):
    status, code = 503, "too_many_streams"


class QueueFull(ServiceError):
    status, code = 503, "queue_full"


class StorageFull(ServiceError):
    """The task's files could not be written (disk full, folder removed)."""

    status, code = 507, "storage_error"


class StorageBudget(ServiceError):
    """Admission: the data folder is at MAX_STORAGE_MB, or the disk below MIN_FREE_DISK_MB."""

    status, code = 507, "storage_full"


class StorageUnavailable(ServiceError):
    """Admission: the data folder vanished and could not be taken back, or cannot be written."""

    status, code = 503, "storage_unavailable"


class OutOfMemory(ServiceError):
    status, code = 507, "out_of_memory"


class GenerationTimeout(ServiceError):
    status, code = 504, "timeout"


class SyncTimeout(ServiceError):
    """The synchronous wait ran out; the task goes on and its result is downloadable later."""

    status, code = 504, "sync_timeout"


class GenerationFailed(ServiceError):
    status, code = 500, "generation_failed"


class TaskCanceled(ServiceError):
    status, code = 409, "canceled"


class ClientGone(TaskCanceled):
    """A synchronous client hung up before its video was ready (and sent no Idempotency-Key to come back with).
    As an answer (nobody reads it) 499, nginx's "client closed request": the access log and metrics say
    `client_gone`."""

    status, code = 499, "client_gone"


# What a task that ends with one of these errors says (`record.failure` stores its code and this message).
TASK_MESSAGES: dict[type[ServiceError], str] = {
    TaskCanceled: "canceled by request (DELETE /tasks/{id})",
    ClientGone: "the client waiting for it hung up before it was done (send an Idempotency-Key to be able to come "
                "back for it)",
    QueueTimeout: "the task waited longer than QUEUE_TIMEOUT and never ran; submit it again",
    ShuttingDown: "the service shut down before this task's turn; submit it again",
    Interrupted: "the service stopped while this task was running; submit it again",
    WorkerLost: "the worker running this task stopped (killed or lost); submit it again",
    StorageFull: "the task's files could not be written or read (disk full or removed); submit it again",
    GenerationFailed: "generation failed; the log has the details",
    ServiceError: "the task runner failed; the log has the details",
}

# Failures stored on a task carry only a code and a message; this maps a code back to its error.
BY_CODE = {cls.code: cls for cls in (OutOfMemory, GenerationFailed, GenerationTimeout, TaskCanceled, ClientGone,
                                     ModelNotReady,
                                     ShuttingDown, InvalidParameter, QueueTimeout, WorkerLost, StorageFull,
                                     Interrupted)}


def from_code(code: str, message: str) -> ServiceError:
    """The error for a failed task's stored code (unknown codes are generation failures)."""
    return BY_CODE.get(code, GenerationFailed)(message, code=code)
