"""Shared fixtures: the tiny pipeline (saved, then loaded back like real weights), apps, images, servers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# One compute thread per process, here and in every process the tests start (they inherit it), set before numpy
# and torch load: the suite's processes run side by side (a service beside the test, two workers, the background
# lane), and two torch thread pools spinning on two cores made each tiny generation 2.8x slower (2.1 s against
# 0.75 s single-threaded, measured side by side here); the suite took 817 s instead of 592.
for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

import numpy as np  # noqa: E402
import pytest
import requests
from PIL import Image

from config import VARIABLES, load_settings
from pipeline import load_generator, save_tiny_pipeline
from server import create_app
from video_diffusion.clock import Clock

ROOT = Path(__file__).resolve().parent.parent


def _one_thread() -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin loaded torch before this file


_one_thread()

# Tests set what they need: the user's settings (their environment, their `.env`) must not reach them. The service's
# variables are cleared here, and subprocesses start in a folder of their own (no `.env`) with the code on PYTHONPATH.
for _variable in VARIABLES:
    os.environ.pop(_variable.name, None)


def process_env(**env: str) -> dict[str, str]:
    """The environment for a service subprocess: this one (cleared of service settings), the code importable."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **env}


GUNICORN = [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py")]


# Small enough that a generation takes a fraction of a second on two cores.
SMALL = {"width": "64", "height": "64", "num_inference_steps": "1", "num_frames": "14"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-svd")
    save_tiny_pipeline(path)
    return path


@pytest.fixture(scope="session")
def generator(tiny_model_dir):
    """The tiny pipeline loaded from its folder through from_pretrained: built once per test session."""
    return load_generator(load_settings({"SVD_MODEL": str(tiny_model_dir)}, dotenv_path=None))


def promtool_problems(exposition: str) -> str:
    """What Prometheus's own linter (`promtool check metrics`, Debian's prometheus package) says of a `/metrics`
    answer: "" when it is clean."""
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                            timeout=30, check=False)
    return "" if result.returncode == 0 else (result.stdout + result.stderr or f"exit {result.returncode}")


class SteppedClock(Clock):
    """The lifecycle's clock, moved forward by the test instead of sleeping (records, expiry, TTLs, reaping)."""

    def __init__(self):
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def settings_for(tmp_path: Path, **env: str):
    return load_settings({"VIDEO_OUTPUT_PATH": str(tmp_path / "videos"), **env}, dotenv_path=None)


def wait_ready(client, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.status_code == 200 or response.json.get("status") == "failed":
            return response.json
        time.sleep(0.02)
    raise AssertionError("the app did not become ready")


@pytest.fixture
def make_app(tmp_path, generator):
    """make_app(load=None, clock=None, **env) -> a ready Flask app on this test's own output folder."""
    apps = []

    def make(load=None, clock=None, **env):
        # Each app owns its data folder (one instance per folder): the first is tmp_path/videos.
        folder = tmp_path / ("videos" if not apps else f"videos-{len(apps) + 1}")
        env = {"VIDEO_OUTPUT_PATH": str(folder), **env}
        app = create_app(settings_for(tmp_path, **env), load=load or (lambda settings: generator), clock=clock)
        apps.append(app)
        wait_ready(app.test_client())
        return app

    yield make
    for app in apps:
        app.extensions["video_diffusion"].backend.stop()


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def image_bytes(size=(96, 64), color=(200, 40, 40), mode="RGB", fmt="PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def upload(data: bytes, name: str = "input.png", field: str = "image", **params) -> dict:
    return {field: (io.BytesIO(data), name), **{k: str(v) for k, v in params.items()}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    """`make run`'s command (gunicorn with gunicorn.conf.py) as a real process on a free port."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = tmp_path / "videos"
        self.log = open(tmp_path / "gunicorn.log", "wb")
        full_env = process_env(**{"HOST": "127.0.0.1", "PORT": str(self.port), "VIDEO_OUTPUT_PATH": str(self.output),
                                  "MALLOC_ARENA_MAX": "2", **env})
        self.process = subprocess.Popen(GUNICORN, cwd=tmp_path, env=full_env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0, path: str = "/health") -> dict:
        """Until `path` answers 200 (`/livez` for a process that answers before it is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.logs()
            try:
                response = requests.get(self.url + path, timeout=2)
                if response.status_code == 200:
                    return response.json()
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError("gunicorn did not become ready:\n" + self.logs())

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the master and its worker at once: a crash, with no chance to tidy up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.log.closed:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@contextlib.contextmanager
def ready_gunicorn(folder: Path, env: dict[str, str]):
    """A Gunicorn on `folder` once `/health` answers 200, stopped on the way out: what module fixtures share."""
    server = Gunicorn(folder, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory, tiny_model_dir):
    """`make run`'s gunicorn on the tiny model, with a home of its own (`server.home`: nothing of it is shared)."""
    folder = tmp_path_factory.mktemp("gunicorn")
    home = folder / "home"
    home.mkdir()
    with ready_gunicorn(folder, {"SVD_MODEL": str(tiny_model_dir), "HOME": str(home), "XDG_RUNTIME_DIR": ""}) as server:
        server.home = home
        yield server


def decode_video(data: bytes, fmt: str) -> tuple[np.ndarray, float]:
    """(frames N x H x W x 3, fps) of an encoded video: PyAV for mp4/webm, Pillow for gif/webp."""
    if fmt in ("mp4", "webm"):
        import av

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            return np.stack(frames), float(stream.average_rate)
    with Image.open(io.BytesIO(data)) as image:
        frames, durations = [], []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
            durations.append(image.info["duration"])
        return np.stack(frames), 1000.0 / float(np.mean(durations))


class RedisServer:
    """Debian's redis-server on a free loopback port; restartable on the same port, with its data if `persist`."""

    def __init__(self, tmp_path: Path, persist: bool = False):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp_path
        self.persist = persist
        self.process = None

    def start(self) -> None:
        redis_server = shutil.which("redis-server")
        assert redis_server, "redis-server (Debian package) is installed by `make test`"
        self.process = subprocess.Popen(
            [redis_server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class WorkerProcess:
    """`python worker.py` as a real subprocess, holding the tiny pipeline."""

    def __init__(self, tmp_path: Path, env: dict[str, str], name: str = "worker"):
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.metrics_port = free_port()
        env = {"WORKER_METRICS_PORT": str(self.metrics_port), **env}
        self.process = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=tmp_path, env=process_env(**env),
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    name: str | None = None  # the worker's unique name, from its first heartbeat

    def find_heartbeat(self, connection) -> bytes | None:
        """This process's heartbeat (names are `host:pid:random`, new at every start)."""
        names = connection.keys(f"vd:worker:{socket.gethostname()}:{self.process.pid}:*")
        if not names:
            return None
        self.name = names[0].decode().split(":", 2)[2]
        return connection.get(names[0])

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def start_worker_processes(folder: Path, model_dir: Path, redis_url: str, count: int = 1, wait_for: str = "ready",
                           **env: str) -> list[WorkerProcess]:
    """`count` workers on `redis_url`, returned once each one's heartbeat says it is `wait_for` (ready)."""
    import redis as redis_client

    base = {"REDIS_URL": redis_url, "SVD_MODEL": str(model_dir), "WORKER_TTL": "3", **env}
    new = [WorkerProcess(folder, base, f"worker-{time.monotonic_ns()}-{i}") for i in range(count)]
    connection = redis_client.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        beats = [w.find_heartbeat(connection) for w in new]
        if all(b and json.loads(b)["state"] == wait_for for b in beats):
            return new
        for worker in new:
            assert worker.process.poll() is None, worker.logs()
        time.sleep(0.1)
    raise AssertionError("workers did not become ready:\n" + "\n".join(w.logs() for w in new))


@pytest.fixture
def start_workers(tmp_path, tiny_model_dir, redis_server):
    """start_workers(n, **env) -> n fresh worker processes on this test's own Redis."""
    workers = []

    def start(count: int = 1, **env: str) -> list[WorkerProcess]:
        new = start_worker_processes(tmp_path, tiny_model_dir, redis_server.url, count, **env)
        workers.extend(new)
        return new

    yield start
    for worker in workers:
        worker.stop()


# --- the background lane -------------------------------------------------------------------------------------
# Checks that only run subprocesses and read what they print (the benchmarks' smoke runs, the fuzzer against a
# live service, the isolation run) start as soon as the session has collected them, one after another on a
# thread of their own, beside the in-process tests; each such test then waits for its own job's result. The
# suite's wall time is then not their sum on top of everything else. A test names its job with
# `@pytest.mark.lane("<name>")`; a module registers the job with `@lane_job("<name>")`, a function of a folder of
# its own and the folder of a tiny model saved for the lane.
LANE_JOBS: dict[str, object] = {}
_LANE: dict[str, object] = {}


def lane_job(name: str):
    def register(job):
        LANE_JOBS[name] = job
        return job
    return register


def pytest_collection_modifyitems(session, config, items):
    import tempfile
    import threading
    from concurrent.futures import Future

    wanted = []
    for item in items:
        for mark in item.iter_markers("lane"):
            if mark.args[0] not in wanted:
                wanted.append(mark.args[0])
    if not wanted:
        return
    # Their tests last: by then their jobs have long finished.
    items[:] = [i for i in items if not i.get_closest_marker("lane")] + [i for i in items if i.get_closest_marker("lane")]
    base = Path(tempfile.mkdtemp(prefix="vd-lane-"))
    for name in wanted:
        _LANE[name] = Future()

    def run() -> None:
        # Saved by a process of its own: the test process's threads stay free for the tests.
        saved = subprocess.run([sys.executable, "-c", "import sys; from pipeline import save_tiny_pipeline; "
                                "save_tiny_pipeline(sys.argv[1])", str(base / "tiny-svd")],
                               cwd=ROOT, env=process_env(), capture_output=True, timeout=300, check=False)
        for name in wanted:
            future = _LANE[name]
            try:
                if saved.returncode != 0:
                    raise RuntimeError(f"the lane's tiny model was not saved: {saved.stderr[-2000:]!r}")
                (base / name).mkdir()
                future.set_result(LANE_JOBS[name](base / name, base / "tiny-svd"))
            except BaseException as exc:  # noqa: BLE001 - the waiting test reports it
                future.set_exception(exc)

    # A daemon thread: an interrupted session does not wait for the lane's last job.
    threading.Thread(target=run, name="lane", daemon=True).start()


def lane_result(name: str, timeout: float = 1800):
    """The result of the lane job `name`: waited for if it still runs (run now if the lane did not start it)."""
    if name not in _LANE:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix=f"vd-{name}-"))
        save_tiny_pipeline(folder / "tiny-svd")
        return LANE_JOBS[name](folder, folder / "tiny-svd")
    return _LANE[name].result(timeout)


def in_lane(test):
    """Run this test's whole body in the background lane: for a test whose only fixtures are `tmp_path` and
    `tiny_model_dir` (the lane gives it a folder of its own and the lane's tiny model) and that drives real
    processes. Its assertions fail the test as usual, when the session reaches it."""
    name = f"{test.__module__}.{test.__name__}"
    LANE_JOBS[name] = test

    def waiting():
        lane_result(name)

    waiting.__name__, waiting.__qualname__, waiting.__doc__ = test.__name__, test.__qualname__, test.__doc__
    waiting.__module__ = test.__module__
    return pytest.mark.lane(name)(waiting)
