"""What both backends do alike: load the model (and warm it up) for whoever holds it, and answer a repeat from
the result cache."""

from __future__ import annotations

import logging
from typing import Callable

from config import Settings
from video_diffusion.lifecycle.record import ModelState, Task, reuse
from video_diffusion.models.contract import Generator, check_generator

log = logging.getLogger(__name__)


def load_model(load: Callable[[Settings], Generator], settings: Settings,
               publish: Callable[[ModelState, Generator | None, str | None], None]) -> None:
    """Load the generator and warm it up when it asks to; `publish(state, generator, error)` at each change.

    Any failure leaves the process up and says why in one sentence (no paths, hosts or exception text).
    """
    try:
        generator = check_generator(load(settings))
    except Exception as exc:  # noqa: BLE001 - stay up and say why, rather than crash-loop
        from pipeline import describe_load_failure

        log.exception("the model failed to load")
        publish(ModelState.FAILED, None, describe_load_failure(exc))
        return
    if generator.needs_warm_up:
        publish(ModelState.WARMING_UP, generator, None)
        try:
            generator.warm_up()
        except Exception:  # noqa: BLE001 - a failed warm-up only means the first request compiles
            log.exception("the warm-up generation failed; the first request of each shape compiles")
    publish(ModelState.READY, generator, None)
    log.info("model ready: %s on %s (%s)", generator.model.label, generator.device, generator.dtype)


def answer_from_cache(original: Task | None, task: Task, result_ttl: int, keep: Callable[[Task], bool],
                      dispatcher, telemetry, now: float) -> Task | None:
    """`task` answered from `original`'s video (finished at once), or None when it cannot be.

    `keep(hit)` stores the answer and gives up the request's place in line; False means generate instead. The
    answer is counted and its webhook queued like any other finished task's.
    """
    hit = reuse(original, task, result_ttl, now)
    if hit is None or not keep(hit):
        return None
    telemetry.task_created(hit)
    try:
        dispatcher.notify(hit)
    except OSError:
        log.exception("task %s: could not queue its webhook", hit.task_id)
    return hit
