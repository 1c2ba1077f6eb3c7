"""The OpenAPI 3.1 document of the service, with the generation parameters taken from the one schema."""

from __future__ import annotations

from typing import Any

from video_diffusion.params import Param

JSON = "application/json"


def _param_schema(param: Param) -> dict[str, Any]:
    schema: dict[str, Any] = {"description": param.help}
    if param.choices:
        schema.update(type="string", enum=list(param.choices), default=param.default)
        return schema
    if param.type is str:
        schema.update(type="string", maxLength=param.max_length, default=param.default)
        return schema
    schema.update(type="integer" if param.type is int else "number", minimum=param.minimum, maximum=param.maximum)
    if param.multiple_of and not param.remainder:  # a 4k+1 rule has no JSON Schema keyword: the help says it
        schema["multipleOf"] = param.multiple_of
    if param.default is not None:
        schema["default"] = param.default
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema_name)}}}


def _errors(*codes: int) -> dict[str, Any]:
    meanings = {400: "No image, or one that does not decode; or not valid HTTP.",
                401: "Missing or wrong API key (when API_KEY is set).",
                408: "The request did not arrive whole within REQUEST_TIMEOUT (or paused 15 s).",
                414: "The request line is over 4094 bytes.",
                431: "A header field over 8190 bytes, over 100 fields, or over 64 KiB of headers.",
                501: "A transfer coding the server does not support.",
                404: "No task with this id (unknown and malformed ids alike).", 409: "The task did not finish, or (POST "
                "/generate) the Idempotency-Key's first request is still being submitted (Retry-After).",
                410: "The video was deleted after RESULT_TTL.", 413: "Body over MAX_UPLOAD_MB, or image over "
                "MAX_IMAGE_PIXELS.", 415: "Not a PNG, JPEG or WebP image.", 422: "A parameter is unknown, of the "
                "wrong type or out of range; a webhook outside WEBHOOK_ALLOW; an Idempotency-Key reused for "
                "another request.", 500: "Generation failed.", 503: "Model not ready, line full, "
                "shutting down, or Redis unreachable (Retry-After).", 504: "The generation or the synchronous wait "
                "ran out of time.", 507: "The GPU ran out of memory for this request, the upload could not be stored, or "
                "the stored videos are at MAX_STORAGE_MB / the disk below MIN_FREE_DISK_MB (storage_full)."}
    # What the front answers before any route sees the request, whatever the path.
    codes = sorted({*codes, 400, 408, 413, 414, 431, 501})
    return {str(code): _json("Error", meanings[code]) for code in codes}


_VIDEO_JSON = {"type": "object", "required": ["video", "content_type", "seed", "task_id", "model", "finish_reason"],
               "properties": {"video": {"type": "string", "contentEncoding": "base64"},
                              "content_type": {"type": "string"}, "seed": {"type": "integer"},
                              "task_id": {"type": "string"}, "model": {"type": "string"},
                              "finish_reason": {"const": "SUCCESS"},
                              "timings": {"type": "object", "additionalProperties": {"type": "number"}}}}

_VIDEO = {"description": "The video (format=frames: a ZIP of PNG frames). With `Accept: application/json`, the same "
                         "bytes base64-encoded in a JSON body.", "headers": {
    name: {"schema": {"type": "string"}, "description": text} for name, text in (
        ("X-Seed", "The seed used."), ("X-Model", "The model that made it."), ("X-Task-Id", "The task's id."),
        ("X-Cache", "POST /generate: `hit` when answered from an identical earlier request's video, else `miss`."),
        ("Server-Timing", "queue, generate, postprocess and encode durations in ms."))},
    # application/octet-stream first: what code generators read as bytes (the answer's own type is the format's).
    "content": {**{media: {"schema": {"type": "string", "format": "binary", "contentMediaType": media}}
                   for media in ("application/octet-stream", "video/mp4", "video/webm", "image/gif", "image/webp",
                                 "application/zip")},
                JSON: {"schema": _VIDEO_JSON}}}


def _task_path(operation_id: str, summary: str, responses: dict[str, Any], method: str = "get") -> dict[str, Any]:
    return {method: {"operationId": operation_id, "summary": summary,
                     "parameters": [{"name": "task_id", "in": "path", "required": True,
                                     "schema": {"type": "string"}}],
                     "responses": responses}}


# From an accepted task to what can be done with it: clients (and fuzzers) can follow these.
_TASK_LINKS = {name: {"operationId": operation, "parameters": {"task_id": "$response.body#/task_id"}}
               for name, operation in (("status", "getStatus"), ("results", "getResults"), ("cancel", "cancelTask"))}


def build_document(params: tuple[Param, ...], root: str = "") -> dict[str, Any]:
    """The document, with the parameter ranges this deployment accepts (MAX_DIMENSION, MAX_STEPS); `servers` is
    the path it is served under (`X-Forwarded-Prefix` behind a proxy TRUSTED_PROXIES trusts), relative to the
    document's own address."""
    fields = {p.name: _param_schema(p) for p in params}
    fields.update(
        webhook={"type": "string", "format": "uri", "description": "An http(s) URL on a host WEBHOOK_ALLOW lists: "
                 "POSTed the task's status JSON when it ends, signed per Standard Webhooks (docs/async.md)."},
        webhook_events={"type": "string", "enum": ["started", "ended", "started,ended"],
                        "description": "`started` also calls `webhook` when the task starts."},
        model={"type": "string", "maxLength": 200,
               "description": "Which of the models this server runs (GET /params lists them in `models`); unset: "
                              "MODEL's, or the only one served."})
    image = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
             "description": "PNG, JPEG or WebP, recognised by its bytes."}
    query = [{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in fields.items()]
    idempotency_key = {"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                       "description": "The same key with the same request within RESULT_TTL returns the task the "
                                      "first made (Idempotent-Replayed: true) instead of making another."}
    prefer = {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string", "enum": [
        "respond-async", "wait"]}, "description": "`respond-async`: answer 202 with a task id; `wait`: the video."}
    return {
        "openapi": "3.1.0",
        "servers": [{"url": root or "/"}],
        "info": {"title": "video-diffusion", "version": "1.0.0",
                 "description": "One image in, a short video out: Stable Video Diffusion, Wan or LTX-Video."},
        "paths": {
            "/generate": {"post": {
                "summary": "Generate a video from an image (synchronously, or as a task with Prefer: respond-async).",
                "parameters": [prefer, idempotency_key, *query],
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                       "properties": {"image": image, **fields},
                                                       "additionalProperties": False}},
                    **{media: {"schema": {"type": "string", "format": "binary", "contentMediaType": media}}
                       for media in ("image/png", "image/jpeg", "image/webp")}}},
                "operationId": "generate",
                "responses": {"200": _VIDEO, "202": {**_json("Task", "Accepted: the task, queued."),
                                                     "links": _TASK_LINKS},
                              **_errors(400, 401, 409, 413, 415, 422, 500, 503, 504, 507)}}},
            "/status/{task_id}": _task_path("getStatus", "A task: status, progress, parameters, error, result URL.", {
                "200": _json("Task", "The task."), **_errors(401, 404, 503)}),
            "/status/{task_id}/events": _task_path("getStatusEvents", "Server-Sent Events: a `status` event (the "
                                                   "task as JSON) at every change, until the task ends.", {
                "200": {"description": "text/event-stream: one `status` event per change; `data` is the task as "
                                       "JSON (the Task schema).",
                        "content": {"text/event-stream": {"schema": {  # each event, as schemathesis reads them
                            "type": "object", "required": ["event", "data"],
                            "properties": {"event": {"const": "status"},
                                           "data": {"type": "string", "contentMediaType": JSON}}}}}},
                **_errors(401, 404, 503)}),
            "/params": {"get": {"operationId": "getParams",
                                "summary": "The generation parameters, their defaults, ranges and help.",
                                "parameters": [{"name": "model", "in": "query", "required": False,
                                                "schema": {"type": "string", "maxLength": 200},
                                                "description": "Which served model's parameters (default: as for "
                                                               "/generate)."}],
                                "responses": {"200": {"description": "The parameter schema.", "content": {JSON: {
                                    "schema": {"type": "object", "required": ["params", "model", "family", "models"],
                                               "properties": {"params": {"type": "array", "items": _PARAM},
                                                              "model": {"type": "string"},
                                                              "family": {"type": "string"},
                                                              "models": {"type": "array",
                                                                         "items": {"type": "string"}}}}}}},
                                    **_errors(401, 422, 503)}}},
            "/results/{task_id}": _task_path("getResults", "A task's video once finished.", {
                "200": _VIDEO, "202": _json("Task", "Not finished yet."),
                "307": {"description": "RESULT_REDIRECT with an S3 result store: the video is at `Location`, a "
                                       "presigned URL valid for 5 minutes.",
                        "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}}},
                **_errors(401, 404, 409, 410, 503)}),
            "/tasks/{task_id}": _task_path("cancelTask", "Cancel a task.", {
                "200": _json("Task", "Canceled."), "202": _json("Task", "Running: it stops at its next step."),
                **_errors(401, 404, 409, 503)}, method="delete"),
            "/health": {"get": {"operationId": "getHealth", "summary": "Readiness: 200 once a model (or, with Redis, a worker) is ready.",
                                "responses": {"200": _json("Health", "Ready."),
                                              "503": _json("Health", "Loading, failed, unhealthy, draining, storage full or unusable, or no "
                                                                  "worker.")}}},
            "/livez": {"get": {"operationId": "getLivez", "summary": "Liveness: 200 whenever the process answers.",
                               "responses": {"200": {"description": "Alive.", "content": {JSON: {"schema": {
                                   "type": "object", "properties": {"status": {"const": "alive"}}}}}}}}},
            "/metrics": {"get": {"operationId": "getMetrics", "summary": "Prometheus metrics.", "responses": {
                "200": {"description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}, **_errors(401)}}},
            "/openapi.json": {"get": {"operationId": "getOpenapi", "summary": "This document.", "responses": {
                "200": {"description": "OpenAPI 3.1.", "content": {JSON: {"schema": {"type": "object"}}}},
                **_errors(401)}}},
        },
        "components": {
            "schemas": {"Error": _ERROR, "Task": _task_schema(), "Health": _HEALTH},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }


_PARAM = {"type": "object", "required": ["name", "type", "default", "help"], "properties": {
    "name": {"type": "string"}, "type": {"type": "string", "enum": ["integer", "number", "string"]},
    "default": {}, "help": {"type": "string"}, "enum": {"type": "array", "items": {}},
    "minimum": {"type": "number"}, "maximum": {"type": "number"}, "maxLength": {"type": "integer"},
    "multipleOf": {"type": "integer"}, "step": {"type": "integer"}, "default_text": {"type": "string"},
    "effective_default": {}}}

_ERROR = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}},
    "task_id": {"type": "string"}, "status_url": {"type": "string"}, "result_url": {"type": "string"}}}

_HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["ok", "loading", "warming_up", "failed", "unhealthy", "draining", "no_workers",
                                          "unavailable", "storage_full", "storage_unavailable"]},
    "storage": {"type": "object", "properties": {
        "state": {"type": "string", "enum": ["ok", "storage_full", "storage_unavailable"]},
        "stored_bytes": {"type": "integer"}, "reserved_bytes": {"type": "integer"},
        "max_bytes": {"type": ["integer", "null"]}, "free_bytes": {"type": ["integer", "null"]},
        "min_free_bytes": {"type": "integer"}, "reason": {"type": "string"}}},
    "model": {"type": "string"}, "noise": {"type": "boolean"}, "device": {"type": "string"},
    "dtype": {"type": "string"},
    "waiting": {"type": "integer"}, "running": {"type": "integer"},
    "error": {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
    "components": {"type": "object", "additionalProperties": {
        "type": "string", "enum": ["running", "done", "restarting", "failed", "stopped", "stalled"]}},
    "mode": {"type": "string"}, "redis": {"type": "string"}, "workers": {"type": "integer"}}}


def _task_schema() -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    return {"type": "object", "required": ["task_id", "status", "progress", "params", "seed"], "properties": {
        "task_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "status": {"type": "string", "enum": ["queued", "started", "finished", "failed", "canceled"]},
        "mode": {"type": "string", "enum": ["sync", "async"]},
        "progress": {"type": "object", "properties": {
            "phase": {"type": "string", "enum": ["waiting", "loading", "denoising", "decoding", "matching colour",
                                                 "looping", "interpolating", "retiming", "encoding", "done"]},
            "step": {"type": "integer"}, "total": {"type": ["integer", "null"]}}},
        "queue_position": {"type": ["integer", "null"], "minimum": 1},
        "created_at": {"type": "string"}, "started_at": nullable_string, "finished_at": nullable_string,
        "seed": {"type": "integer"}, "params": {"type": "object"}, "model": nullable_string,
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
        "error": {"type": ["object", "null"], "properties": {"code": {"type": "string"},
                                                              "message": {"type": "string"}}},
        "expired": {"type": "boolean"}, "status_url": {"type": "string"}, "result_url": nullable_string,
        "result": {"type": ["object", "null"], "properties": {
            "format": {"type": "string"}, "content_type": {"type": "string"}, "bytes": {"type": "integer"},
            "frames": {"type": "integer"}}},
        "cached": {"type": "boolean", "description": "Answered from an identical earlier request's video."}}}
