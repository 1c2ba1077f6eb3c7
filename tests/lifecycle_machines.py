"""Hypothesis state machines over both backends: random interleavings of submit, cancel, time passing, a worker
or runner dying, a crash and a restart. Invariants: every task's stored history is a legal path of the
lifecycle, and every accepted task ends. Used by tests/test_stateful.py (short) and `make soak` (long)."""

from __future__ import annotations

import shutil
from collections import Counter
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from PIL import Image

from video_diffusion.backends import disk_store as store_module
from config import load_settings
from pipeline import ModelInfo
from video_diffusion.backends.redis_store import REDIS_ERRORS
from video_diffusion.lifecycle.record import TRANSITIONS, Task, TaskStatus, new_task_id
from video_diffusion.telemetry import Telemetry

PARAMS = {"motion_bucket_id": 127, "fps": 6, "num_frames": 2, "decode_chunk_size": 8, "num_inference_steps": 4,
          "noise_aug_strength": 0.02, "min_guidance_scale": 1.0, "max_guidance_scale": 3.0, "seed": 1,
          "width": 64, "height": 64, "sizing": "crop", "format": "gif"}


class SleepsPerStep:
    """Stands in for the pipeline where only timing matters: a short sleep per step, black frames.
    `hang` makes steps block until `released`: a worker that died without a word, or one so slow that its
    task was given up on; released, it carries on and tries to finish."""

    model = ModelInfo(name="sleeps", source=None, noise=True, defaults={})
    device, dtype, needs_warm_up = "cpu", "float32", False

    def __init__(self, step_seconds: float = 0.01):
        self.step_seconds = step_seconds
        self.hang = threading.Event()
        self.released = threading.Event()

    def generate(self, image, params, progress):
        total = params["num_inference_steps"]
        for step in range(total + 1):
            if self.hang.is_set():
                self.released.wait()
            progress("denoising", step, total)
            time.sleep(self.step_seconds)
        return np.zeros((params["num_frames"], params["height"], params["width"], 3), np.uint8)

    def warm_up(self):
        pass

    def describe(self):
        return {"model": self.model.label, "noise": True, "device": "cpu", "dtype": "float32"}

    def memory_stats(self):
        return {}


def _reachable(origin: TaskStatus) -> set[TaskStatus]:
    seen, todo = {origin}, [origin]
    while todo:
        for target in TRANSITIONS[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def legal(history: list[TaskStatus]) -> bool:
    """Each status reachable from the one before (histories may be sampled, so steps can be skipped): nothing
    goes backwards and nothing leaves a terminal status."""
    return all(b in _reachable(a) for a, b in zip(history, history[1:]))


class _Machine(RuleBasedStateMachine):
    """What both machines share: the accepted tasks, the histories, the checks."""

    histories: dict[str, list[TaskStatus]]
    totals: Counter = Counter()  # over every example of a run: tasks accepted and how they ended

    def __init__(self):
        super().__init__()
        self.accepted: list[str] = []
        self.histories = {}
        self.generators: list[SleepsPerStep] = []

    def record(self, task: Task) -> None:
        history = self.histories.setdefault(task.task_id, [])
        if not history or history[-1] is not task.status:
            history.append(task.status)

    def submit_to(self, backend) -> None:
        """One new task, admitted and submitted as a request is."""
        task = Task(task_id=new_task_id(), mode="async", params=dict(PARAMS))
        with backend.admission(task.mode):
            self.accepted.append(backend.submit(task, Image.new("RGB", (64, 64))).task_id)

    @invariant()
    def every_history_is_a_legal_path(self):
        for task_id, history in self.histories.items():
            assert legal(history), (task_id, [s.value for s in history])

    def wait_until_all_ended(self, get, timeout: float = 60.0) -> dict[str, Task]:
        deadline = time.monotonic() + timeout
        while True:
            tasks = {task_id: get(task_id) for task_id in self.accepted}
            if all(t is not None and t.status.terminal for t in tasks.values()):
                type(self).totals.update(["accepted"] * len(tasks) + [t.status.value for t in tasks.values()])
                return tasks
            assert time.monotonic() < deadline, {k: t and t.status.value for k, t in tasks.items()}
            time.sleep(0.05)


class EmbeddedMachine(_Machine):
    """The embedded backend on one data folder; crashes leave the folder as a SIGKILL would."""

    def __init__(self):
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="vd-stateful-"))
        self.backend = None
        self._real_save = store_module.DiskStore.save
        machine = self

        def recording_save(store, task):
            machine._real_save(store, task)
            if store is machine.backend.store:
                machine.record(task)

        store_module.DiskStore.save = recording_save

    @initialize()
    def start(self):
        self.backend = self._start()

    def _start(self):
        from video_diffusion.backends.embedded import EmbeddedBackend

        settings = load_settings({"VIDEO_OUTPUT_PATH": str(self.folder), "QUEUE_TIMEOUT": "2", "RESULT_TTL": "2",
                                  "MAX_QUEUE": "50"}, dotenv_path=None)
        generator = SleepsPerStep()
        self.generators.append(generator)
        backend = EmbeddedBackend(settings, store_module.DiskStore(self.folder), lambda _s: generator, Telemetry())
        backend.start()
        deadline = time.monotonic() + 10
        while backend.health().status != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return backend

    @rule(count=st.integers(1, 3))
    def submit(self, count):
        for _ in range(count):
            self.submit_to(self.backend)

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def cancel(self, data):
        self.backend.cancel(data.draw(st.sampled_from(self.accepted)))

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3, 2.1]))
    def time_passes(self, seconds):
        time.sleep(seconds)

    @rule()
    def runner_dies_once(self):
        backend = self.backend

        def dies(task):
            del backend._run_one  # once: the restarted loop runs tasks again
            raise RuntimeError("injected: the runner dies")

        backend._run_one = dies

    @rule(graceful=st.booleans())
    def restart(self, graceful):
        old = self.backend
        if graceful:
            old.stop()
        else:  # as SIGKILL would leave it: nothing more reaches the disk, the lock goes with the process
            def dead(*_args, **_kwargs):
                raise OSError("this process is dead")

            for name in ("save", "write_input", "delete", "delete_files", "delete_input"):
                setattr(old.store, name, dead)
            old.supervisor.stopping.set()
            with old._cond:
                old._cond.notify_all()
            old.store.unlock()
        self.backend = self._start()

    def teardown(self):
        try:
            if self.backend is not None:
                ended = self.wait_until_all_ended(self.backend.get)
                for task in ended.values():
                    self.record(task)
                    video = self.backend.result(task) if task.status is TaskStatus.FINISHED else None
                    if video is not None:  # None: expired meanwhile
                        with video:
                            assert video.read(6) == b"GIF89a"
                self.every_history_is_a_legal_path()
                self.backend.stop()
        finally:
            store_module.DiskStore.save = self._real_save
            shutil.rmtree(self.folder, ignore_errors=True)


class RedisMachine(_Machine):
    """The Redis backend's API with in-process workers that take jobs as RQ does (move to the intermediate
    list, name the worker, run); a worker that dies stops beating and hangs, as a SIGKILLed one would."""

    redis_url: str  # set by the test before the machine runs

    def __init__(self):
        super().__init__()
        import redis as redis_client

        redis_client.Redis.from_url(self.redis_url).flushdb()
        self.settings = load_settings({"REDIS_URL": self.redis_url, "WORKER_TTL": "3", "QUEUE_TIMEOUT": "3",
                                       "RESULT_TTL": "3", "MAX_QUEUE": "50"}, dotenv_path=None)
        self.workers: list[tuple] = []
        self.api = None

    @initialize()
    def start(self):
        from video_diffusion.backends.redis_api import RedisBackend

        self.api = RedisBackend(self.settings, telemetry=Telemetry())
        self.api.start()
        self._start_worker()

    def _start_worker(self):
        from video_diffusion.backends.redis_worker import WorkerRuntime

        runtime = WorkerRuntime(self.settings, Telemetry())
        generator = SleepsPerStep()
        self.generators.append(generator)
        runtime.load(lambda _s: generator)
        runtime.start_heartbeat()
        stop = threading.Event()
        thread = threading.Thread(target=self._work, args=(runtime, stop), daemon=True)
        thread.start()
        self.workers.append((runtime, generator, stop, thread))

    def _work(self, runtime, stop):
        """RQ's dequeue in short, through its public API: pop into the intermediate list, name the worker and take
        the job off that list in one transaction, run it, delete the job."""
        from rq import Queue
        from rq.exceptions import DequeueTimeout

        connection, queue = runtime.redis, runtime.store.queue
        runtime.rq_worker = f"rq-{runtime.name}"
        while not stop.is_set():
            try:
                popped = Queue.dequeue_any([queue], 0.2, connection=connection)
            except DequeueTimeout:
                continue
            except REDIS_ERRORS:
                return  # the test's Redis is gone: so is this worker
            job = popped[0]
            with connection.pipeline() as pipe:
                job.prepare_for_execution(runtime.rq_worker, pipeline=pipe)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                pipe.execute()
            runtime.run(job.id)
            job.delete()

    def _observe(self):
        for task_id in self.accepted:
            task = self.api.store.load(task_id)
            if task is not None:
                self.record(task)

    @rule(count=st.integers(1, 3))
    def submit(self, count):
        for _ in range(count):
            self.submit_to(self.api)
        self._observe()

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def cancel(self, data):
        self.api.cancel(data.draw(st.sampled_from(self.accepted)))
        self._observe()

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    def time_passes(self, seconds):
        deadline = time.monotonic() + seconds
        while True:
            self._observe()
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)

    @precondition(lambda self: any(not w[2].is_set() for w in self.workers))
    @rule()
    def a_worker_dies(self):
        runtime, generator, stop, _ = next(w for w in self.workers if not w[2].is_set())
        stop.set()
        generator.hang.set()  # its running task, if any, never advances again
        runtime.supervisor.stop(timeout=0)  # no more heartbeats
        runtime.redis.delete(f"vd:worker:{runtime.name}")  # as if WORKER_TTL had passed
        self._observe()

    @precondition(lambda self: any(w[1].hang.is_set() and not w[1].released.is_set() for w in self.workers))
    @rule()
    def a_dead_worker_wakes(self):
        """The slow worker whose task was given up on carries on and tries to save its steps and its end."""
        next(w for w in self.workers if w[1].hang.is_set() and not w[1].released.is_set())[1].released.set()
        self.time_passes(0.3)

    @rule()
    def a_worker_starts(self):
        self._start_worker()

    def teardown(self):
        try:
            if self.api is not None:
                if all(w[2].is_set() for w in self.workers):
                    self._start_worker()
                for _runtime, generator, _stop, _thread in self.workers:
                    generator.released.set()  # every zombie wakes and tries to write: all must be refused
                ended = self.wait_until_all_ended(lambda t: (self._observe(), self.api.get(t))[1], timeout=90)
                for task in ended.values():
                    self.record(task)
                    if task.status is TaskStatus.FINISHED and not task.expired:
                        video = self.api.result(task)
                        assert video is None or video.read(6) == b"GIF89a"  # None: expired meanwhile
                self.every_history_is_a_legal_path()
        finally:
            for runtime, generator, stop, thread in self.workers:
                stop.set()
                generator.released.set()
                thread.join(10)
                runtime.stop()
            if self.api is not None:
                self.api.stop()
