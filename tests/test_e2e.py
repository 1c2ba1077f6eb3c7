"""End to end through `make run`'s gunicorn on a free port, with real HTTP clients (curl, requests)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import ROOT, SMALL, decode_video, image_bytes

pytestmark = pytest.mark.slow
# The tiny model's own default size and steps: a few seconds, long enough to queue behind.
LONG = {"num_frames": "14"}


def post(server, timeout=120, **params):
    return requests.post(server.url + "/generate", files={"image": ("input.png", image_bytes(), "image/png")},
                         data=params, timeout=timeout)


def health(server) -> dict:
    return requests.get(server.url + "/health", timeout=5).json()


def wait_for(condition, timeout=30.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def records(server, task_ids) -> list[dict]:
    return [json.loads((server.output / task_id / "task.json").read_text()) for task_id in task_ids]


def test_the_seed_curl_call(gunicorn_server, tmp_path):
    (tmp_path / "input.png").write_bytes(image_bytes(size=(320, 240)))
    result = subprocess.run(
        ["curl", "-sS", "-f", "-X", "POST", f"{gunicorn_server.url}/generate", "-F", "image=@input.png",
         "-F", "motion_bucket_id=127", "-F", "fps=6", "-F", "num_frames=25", "-F", "num_inference_steps=2",
         "--output", "video.mp4"], cwd=tmp_path, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    frames, fps = decode_video((tmp_path / "video.mp4").read_bytes(), "mp4")
    assert frames.shape == (25, 144, 256, 3) and fps == 6


def test_the_readmes_curl_runs_verbatim(gunicorn_server, tmp_path):
    """README's "Make a video" command, as a newcomer pastes it (only the port is this test's)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(curl -X POST http://localhost:5013/generate [^\n]*)\n```", readme).group(1)
    (tmp_path / "input.png").write_bytes(image_bytes(size=(320, 240)))
    argv = shlex.split(command.replace("http://localhost:5013", gunicorn_server.url))
    result = subprocess.run([*argv, "-sS", "-f"], cwd=tmp_path, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    frames, fps = decode_video((tmp_path / "video.mp4").read_bytes(), "mp4")
    assert frames.shape == (14, 144, 256, 3) and fps == 6  # the tiny model's own frames and size


def test_health_reports_the_model_and_says_it_is_noise(gunicorn_server):
    info = health(gunicorn_server)
    assert info["status"] == "ok" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert "random weights: the output is noise" in info["model"]
    assert "serving" in gunicorn_server.logs() and "the output is noise" in gunicorn_server.logs()
    assert "torchvision" not in gunicorn_server.logs()  # the processor backend is chosen, not guessed


def test_four_concurrent_requests_succeed_one_generation_at_a_time_in_arrival_order(gunicorn_server):
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for _ in range(4):
            futures.append(pool.submit(post, gunicorn_server, **SMALL))
            time.sleep(0.05)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 4
    tasks = records(gunicorn_server, [r.headers["X-Task-Id"] for r in responses])
    runs = sorted((t["started_at"], t["finished_at"]) for t in tasks)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(runs, runs[1:])), runs
    assert [t["started_at"] for t in tasks] == sorted(t["started_at"] for t in tasks)


def test_health_answers_quickly_during_a_generation(gunicorn_server):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, gunicorn_server, **LONG)
        wait_for(lambda: health(gunicorn_server)["running"] == 1)
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            assert requests.get(gunicorn_server.url + "/health", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - started)
        assert health(gunicorn_server)["running"] == 1  # all of them answered while it ran
        assert running.result().status_code == 200
    # Generous for a shared two-core machine; BENCHMARKS.md has the measured latencies.
    assert max(latencies) < 0.5, latencies


def test_the_ninth_waiting_request_gets_503_at_once(gunicorn_server):
    with ThreadPoolExecutor(10) as pool:
        first = pool.submit(post, gunicorn_server, **LONG)
        wait_for(lambda: health(gunicorn_server)["running"] == 1)
        waiting = [pool.submit(post, gunicorn_server, **SMALL) for _ in range(8)]
        wait_for(lambda: health(gunicorn_server)["waiting"] == 8)
        started = time.monotonic()
        refused = post(gunicorn_server, **SMALL)
        assert time.monotonic() - started < 2
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full" and "MAX_QUEUE=8" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) > 0
        assert first.result().status_code == 200
        assert [f.result().status_code for f in waiting] == [200] * 8


def raw_request(server, body_params: dict, headers: dict | None = None) -> socket.socket:
    boundary = "b0undary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in body_params.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + image_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                 f"{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_client_that_hangs_up_while_waiting_gives_up_its_place(gunicorn_server):
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, gunicorn_server, **LONG)
        wait_for(lambda: health(gunicorn_server)["running"] == 1)
        sock = raw_request(gunicorn_server, SMALL)
        wait_for(lambda: health(gunicorn_server)["waiting"] == 1)
        sock.close()
        wait_for(lambda: health(gunicorn_server)["waiting"] == 0, timeout=5)
        assert health(gunicorn_server)["running"] == 1  # gone from the line before its turn came
        assert first.result().status_code == 200
    canceled = [json.loads(p.read_text()) for p in Path(gunicorn_server.output).glob("*/task.json")]
    gone = [t for t in canceled if t["status"] == "canceled" and t["started_at"] is None]
    assert gone and gone[-1]["error"]["code"] == "client_gone" and "hung up" in gone[-1]["error"]["message"]
    assert 'status="client_gone"' in requests.get(gunicorn_server.url + "/metrics", timeout=10).text


def test_a_client_with_an_idempotency_key_that_hangs_up_keeps_its_task_and_the_retry_gets_the_video(
        gunicorn_server):
    """Before: a proxy's hang-up canceled the task and the retry with the same key got 409 `canceled by
    request`, the exact case the key exists for."""
    key = {"Idempotency-Key": f"hang-up-{time.time()}"}
    params = dict(SMALL, num_inference_steps=20, seed=77)
    sock = raw_request(gunicorn_server, params, key)
    wait_for(lambda: health(gunicorn_server)["running"] == 1)
    sock.close()  # the proxy gave up
    time.sleep(1.0)  # the service notices between steps
    retry = requests.post(gunicorn_server.url + "/generate", files={"image": ("i.png", image_bytes())},
                          data={k: str(v) for k, v in params.items()}, headers=key, timeout=120)
    assert retry.status_code == 200, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true" and decode_video(retry.content, "mp4")[0].shape[0] == 14
    assert "keeps the task running" in gunicorn_server.logs()


def test_gunicorn_loads_the_model_in_the_worker_not_the_master(gunicorn_server):
    logs = gunicorn_server.logs()
    worker_pid = int(re.search(r"Booting worker with pid: (\d+)", logs).group(1))
    loaded_in = int(re.search(r"\[(\d+)\] INFO video_diffusion\.backends\.shared: model ready", logs).group(1))
    assert loaded_in == worker_pid != gunicorn_server.process.pid


def test_demo_script_submits_follows_and_downloads(gunicorn_server, tmp_path):
    (tmp_path / "image.jpg").write_bytes(image_bytes(fmt="JPEG"))
    result = subprocess.run(
        ["bash", str(Path(__file__).resolve().parent.parent / "demo.sh"), "image.jpg", "width=64", "height=64",
         "num_inference_steps=3"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "API_URL": gunicorn_server.url, "POLL_SECONDS": "0.2"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued" in result.stdout and "saved output_video.mp4" in result.stdout
    frames, fps = decode_video((tmp_path / "output_video.mp4").read_bytes(), "mp4")
    assert frames.shape == (14, 64, 64, 3) and fps == 6


def test_demo_script_finds_the_service_from_its_dotenv_like_the_service(gunicorn_server, tmp_path):
    """Before: demo.sh called 5013 whatever `.env` said (PORT=6501 there)."""
    (tmp_path / "image.png").write_bytes(image_bytes())
    (tmp_path / "service.env").write_text(f"# the service's settings\nPORT='{gunicorn_server.port}'  # here\n")
    env = {k: v for k, v in os.environ.items() if k not in ("API_URL", "PORT", "API_KEY")}
    result = subprocess.run(
        ["bash", str(Path(__file__).resolve().parent.parent / "demo.sh"), "image.png", "width=64", "height=64",
         "num_inference_steps=2"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**env, "DOTENV": str(tmp_path / "service.env"), "POLL_SECONDS": "0.2"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "output_video.mp4").stat().st_size > 0


def test_the_images_healthcheck_asks_the_port_the_service_listens_on(gunicorn_server):
    """Before: HEALTHCHECK hard-coded 5013, so a container with another PORT was unhealthy for ever."""
    import shlex

    line = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if "CMD [\"python\", \"-c\"" in line)
    command = json.loads(line.split("CMD", 1)[1].strip())
    env = {**os.environ, "PORT": str(gunicorn_server.port)}
    assert subprocess.run(command, cwd=ROOT, env=env, timeout=30, check=False).returncode == 0, shlex.join(command)
    other = {**env, "PORT": str(gunicorn_server.port + 1 if gunicorn_server.port < 65535 else 1)}
    assert subprocess.run(command, cwd=ROOT, env=other, capture_output=True, timeout=30, check=False).returncode != 0


def test_gunicorn_makes_no_control_socket_in_the_users_home(gunicorn_server):
    """Before: every gunicorn on a host shared ~/.gunicorn/gunicorn.ctl (the second one's replaced the first's)."""
    assert not (gunicorn_server.home / ".gunicorn").exists() and not list(gunicorn_server.home.rglob("*.ctl"))


def test_demo_script_reports_a_refused_submission(gunicorn_server, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    result = subprocess.run(["bash", str(Path(__file__).resolve().parent.parent / "demo.sh"), "notes.txt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "API_URL": gunicorn_server.url})
    assert result.returncode == 1 and "415" in result.stderr and "unsupported_media_type" in result.stderr


def test_curl_reads_the_progress_events(gunicorn_server):
    task_id = post_async(gunicorn_server, **dict(SMALL, num_inference_steps=20))
    result = subprocess.run(["curl", "-sS", "-N", f"{gunicorn_server.url}/status/{task_id}/events"],
                            capture_output=True, text=True, timeout=60, check=True)
    events = [json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert result.stdout.startswith("event: status\n")
    assert events[-1]["status"] == "finished"
    steps = [e["progress"]["step"] for e in events if e["status"] == "started"]
    assert steps == sorted(steps) and len(set(steps)) >= 3  # it streamed the steps as they happened


def post_async(server, **params) -> str:
    response = requests.post(server.url + "/generate", files={"image": ("i.png", image_bytes(), "image/png")},
                             data=params, headers={"Prefer": "respond-async"}, timeout=30)
    assert response.status_code == 202 and response.reason == "Accepted"  # RFC 9110's phrase, not "ACCEPTED"
    return response.json()["task_id"]


def test_an_oversized_body_is_refused_before_it_is_read(gunicorn_server):
    with socket.create_connection(("127.0.0.1", gunicorn_server.port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 524288000\r\n\r\n--b\r\n")  # says 500 MB, sends a few bytes
        started = time.monotonic()
        answer = b""
        while b"payload_too_large" not in answer and time.monotonic() - started < 10:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413")
    assert time.monotonic() - started < 5
    assert '"payload_too_large"' in answer
