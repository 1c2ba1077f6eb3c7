"""Responses: a task as JSON, its video, and its progress as Server-Sent Events."""

from __future__ import annotations

import base64
import io
import json
import time

from flask import Response, current_app, g, has_request_context, jsonify, redirect, request, send_file, stream_with_context

from video_diffusion import errors
from video_diffusion.lifecycle.record import Task, TaskStatus, status_document

EVENT_INTERVAL = 0.25  # seconds between checks of a task followed by /status/<id>/events
EVENT_KEEPALIVE = 15.0  # seconds between comment lines that keep proxies from closing an idle stream
EVENT_STREAM_SECONDS = 300.0  # a stream ends after this; EventSource reconnects, other clients poll


def _service():
    return current_app.extensions["video_diffusion"]


def status_body(task: Task) -> dict:
    """The task as clients see it."""
    position = _service().backend.queue_position(task.task_id) if task.status is TaskStatus.QUEUED else None
    return status_document(task, position, request.script_root if has_request_context() else "")


def status_response(task: Task, status_code: int, **headers: str):
    """The task as JSON, from `/status`, a 202 `/results`, `DELETE /tasks` and async submission."""
    response = jsonify(status_body(task))
    response.status_code = status_code
    response.headers.update({"X-Task-Id": task.task_id, **headers})
    return response


def video_response(task: Task):
    """The finished task's video with its seed, model and timings; the task's own error otherwise.

    With `Accept: application/json` (preferred over the video's type), the same video as base64 in a JSON body.
    """
    if task.status is not TaskStatus.FINISHED:
        raise errors.from_code(task.error["code"], task.error["message"])
    content_type = task.result["content_type"]
    wants_json = _wants_json(content_type)
    url = None if wants_json else _service().backend.result_url(task)
    if url is not None:
        response = redirect(url, 307)  # RESULT_REDIRECT: the store serves the bytes, for a few minutes
        response.headers["Cache-Control"] = "no-store"
        g.absolute_location = True  # the store's own URL, not one made from the request's Host
    else:
        response = _stored_video(task, content_type, wants_json)
    response.vary.add("Accept")
    timings = task.timings
    response.headers.update({
        "X-Task-Id": task.task_id,
        "X-Seed": str(task.params["seed"]),
        "X-Model": task.model,
        "Server-Timing": ", ".join(f"{name};dur={timings.get(key, 0) * 1000:.1f}" for name, key in
                                   (("queue", "queue_wait"), ("generate", "generation"),
                                    ("postprocess", "postprocessing"), ("encode", "encoding"))),
    })
    return response


def _stored_video(task: Task, content_type: str, wants_json: bool):
    """The video streamed from where the backend keeps it, or as base64 in JSON."""
    video = _service().backend.result(task)
    if video is None:
        raise errors.ResultExpired(f"the video was deleted RESULT_TTL={_service().settings.result_ttl} s after it "
                                   "was made")
    size = video.seek(0, io.SEEK_END)
    video.seek(0)
    if wants_json:
        return _json_video(task, video, size)
    # Ranges and validators from what the record knows, whatever the stream is (a file, Redis bytes, an S3
    # object): send_file itself only knows the size of a path or a BytesIO.
    response = send_file(video, mimetype=content_type, as_attachment=True, download_name=task.result["filename"],
                         max_age=0, conditional=False, etag=False)
    response.content_length = size
    response.set_etag(f"{task.cached_from or task.task_id}-{size}")
    return response.make_conditional(request.environ, accept_ranges=True, complete_length=size)


def _wants_json(content_type: str) -> bool:
    """`Accept` names application/json itself, at least as high as the video's type (`*/*` alone: the video)."""
    accept = request.accept_mimetypes
    quality = max((q for value, q in accept if value.lower() == "application/json"), default=0)
    return quality > 0 and quality >= accept[content_type]


B64_CHUNK = 3 * 64 * 1024  # bytes of video per base64 piece: a multiple of 3, so the pieces join into one string


def _json_video(task: Task, video, size: int) -> Response:
    """`{"video": <base64>, "content_type", "seed", "task_id", "model", "finish_reason", "timings"}` (the shape
    of Stability's hosted API), streamed: the video is never held in memory twice."""
    rest = {"content_type": task.result["content_type"], "seed": task.params["seed"], "task_id": task.task_id,
            "model": task.model, "finish_reason": "SUCCESS", "timings": task.timings}
    head, tail = b'{"video": "', b'", ' + json.dumps(rest).encode()[1:]

    def body():
        with video:
            yield head
            while piece := video.read(B64_CHUNK):
                yield base64.b64encode(piece)
            yield tail

    response = Response(body(), mimetype="application/json")
    response.content_length = len(head) + 4 * ((size + 2) // 3) + len(tail)
    return response


def event_stream(task: Task) -> Response:
    """Server-Sent Events: one `status` event per change of the task, until it ends (`curl -N` reads it).

    Each open stream holds a thread, so at most MAX_EVENT_STREAMS are open at once (503 beyond) and each lasts
    at most EVENT_STREAM_SECONDS.
    """
    service = _service()
    if not service.streams.acquire(blocking=False):
        raise errors.TooManyStreams(f"{service.settings.max_event_streams} event streams are open "
                                    "(MAX_EVENT_STREAMS); poll /status/{task_id} instead", retry_after=5)
    backend = service.backend

    def events():
        last, idle, current = None, 0.0, task
        ends = time.monotonic() + EVENT_STREAM_SECONDS
        while time.monotonic() < ends:
            body = status_body(current)
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
            current = backend.get(task.task_id) or current

    response = Response(stream_with_context(events()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Task-Id": task.task_id})
    response.call_on_close(service.streams.release)
    return response
