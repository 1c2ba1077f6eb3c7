"""Running one task: from its input image to its video file, through segments, loop, retiming and encoding.

Both backends call `execute` with their own progress saving and cancel check; every failure comes back as a
status and a code, never an exception.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from encoders import FORMATS, encode_video
from video_diffusion import errors
from video_diffusion.errors import GenerationTimeout, InvalidParameter, ServiceError, TaskCanceled
from video_diffusion.files import write_atomic
from video_diffusion.lifecycle.record import Task, TaskStatus, failure
from video_diffusion.media.images import fit_image
from video_diffusion.media.postprocess import Clip, colour_stats, looped, match_colours, retimed
from video_diffusion.params import MAX_SEED, resolve_defaults

log = logging.getLogger(__name__)


def run_task(generator, task: Task, image: Image.Image, out_path: Path,
             progress: Callable[[str, int, int], None]) -> None:
    """Generate and encode `task`'s video into `out_path`, filling its resolved params, result and timings.

    Segments run one after the other, each conditioned on the last frame of the one before; then the loop, the
    change of frame rate and the encoding. Progress counts denoising steps across all segments.
    """
    params = resolve_defaults(task.params, generator.model.defaults, generator.model.family)
    limit = generator.model.max_steps
    if limit is not None and params["num_inference_steps"] > limit:  # an API that did not know the model let it in
        raise InvalidParameter(f"`num_inference_steps` must be at most {limit} with {generator.model.name}, got "
                               f"{params['num_inference_steps']}", field="num_inference_steps")
    sized = fit_image(image, params["width"], params["height"], params["sizing"])
    params["width"], params["height"] = sized.size
    task.params, task.model = params, generator.model.label
    started = time.perf_counter()
    clip = generate_segments(generator, sized, params, progress)
    generated = time.perf_counter()
    steps = params["segments"] * params["num_inference_steps"]
    if params["loop"] != "none":
        progress("looping", steps, steps)
        clip = looped(clip, params["loop"])
    # Slower: frames dropped (indices). Faster: in-betweens made on the way into the encoder, so "interpolating"
    # covers the encoding too, and the timings count it there.
    frames = retimed(clip, params["fps"], params["output_fps"], looped=params["loop"] != "none")
    processed = time.perf_counter()
    progress("interpolating" if params["output_fps"] > params["fps"] else "encoding", steps, steps)
    fmt = FORMATS[params["format"]]
    write_atomic(out_path, lambda tmp: encode_video(frames, params["output_fps"], fmt.name, tmp))
    task.timings.update(generation=generated - started, postprocessing=processed - generated,
                        encoding=time.perf_counter() - processed)
    task.result = {"format": fmt.name, "content_type": fmt.content_type, "bytes": out_path.stat().st_size,
                   "filename": f"{task.task_id}.{fmt.extension}", "frames": len(frames)}


def generate_segments(generator, image: Image.Image, params: dict[str, Any],
                      progress: Callable[[str, int, int], None]) -> Clip:
    """`segments` pipeline calls chained on their last frames (seed + k for segment k), each later one without
    its first frame and colour-matched to the first: N + (segments - 1) x (N - 1) frames, side by side (no copy
    joins them)."""
    steps, count = params["num_inference_steps"], params["segments"]
    clips, reference, condition = [], None, image
    for k in range(count):
        def segment_progress(phase: str, step: int, total: int, done: int = k * steps) -> None:
            progress(phase, done + step, count * steps)

        frames = generator.generate(condition, {**params, "seed": (params["seed"] + k) % (MAX_SEED + 1)},
                                    segment_progress)
        if k == 0:
            reference = colour_stats(frames)
        else:
            progress("matching colour", (k + 1) * steps, count * steps)
            frames = match_colours(frames, reference)[1:]
        clips.append(frames)
        condition = Image.fromarray(frames[-1])
    return Clip(clips)


def execute(generator, task: Task, load_image: Callable[[], Image.Image], out_path: Path,
            progress: Callable[[str, int, int], None]) -> tuple[TaskStatus, dict[str, str] | None]:
    """Run `task` and say how it ended: every failure becomes a status and a code, never an exception."""
    try:
        run_task(generator, task, load_image(), out_path, progress)
    except TaskCanceled as exc:  # by request, or its client went away
        return TaskStatus.CANCELED, failure(type(exc))
    except ServiceError as exc:
        return TaskStatus.FAILED, {"code": exc.code, "message": exc.message}
    except OSError:  # disk full, a folder deleted underneath, an unreadable input
        log.exception("task %s: storage failed", task.task_id)
        return TaskStatus.FAILED, failure(errors.StorageFull)
    except Exception:  # noqa: BLE001 - one task's failure must not stop the runner
        log.exception("task %s failed", task.task_id)
        return TaskStatus.FAILED, failure(errors.GenerationFailed)
    return TaskStatus.FINISHED, None


def progress_recorder(task: Task, job_timeout: int, save: Callable[[Task], None],
                      cancel_requested: Callable[[], bool]) -> Callable[[str, int, int], None]:
    """The progress callback of a run: records each step, and stops the run when canceled or out of time."""
    deadline = time.monotonic() + job_timeout

    def progress(phase: str, step: int, total: int) -> None:
        reason = cancel_requested()  # None, or the error that says why (TaskCanceled, ClientGone)
        if reason:
            reason = reason if isinstance(reason, type) else TaskCanceled
            raise reason(errors.TASK_MESSAGES[reason])
        task.phase, task.step, task.total_steps = phase, step, total
        save(task)
        if time.monotonic() > deadline:
            raise GenerationTimeout(f"the generation ran longer than JOB_TIMEOUT={job_timeout} s")

    return progress
