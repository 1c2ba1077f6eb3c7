"""Behind a real nginx (Debian's), configured with the snippet docs/deploy.md gives users, on a sub-path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from conftest import ROOT, SMALL, decode_video, free_port, image_bytes, ready_gunicorn
from test_page import CHROMIUM_ARGS

pytestmark = pytest.mark.slow
DEPLOY = ROOT / "docs" / "deploy.md"


def nginx_snippet() -> str:
    """The first ```nginx block of docs/deploy.md, as a user copies it."""
    return re.search(r"```nginx\n(.*?)```", DEPLOY.read_text(), re.S).group(1)


class Nginx:
    """nginx in the foreground, with the documented snippet pointed at `upstream_port` and listening on loopback."""

    def __init__(self, folder: Path, upstream_port: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        snippet = nginx_snippet()
        for pattern, replacement in ((r"server 127\.0\.0\.1:5013;", f"server 127.0.0.1:{upstream_port};"),
                                     (r"listen 80;", f"listen 127.0.0.1:{self.port};")):
            snippet, count = re.subn(pattern, replacement, snippet)
            assert count == 1, f"docs/deploy.md's nginx snippet no longer has `{pattern}`"
        temp = "\n".join(f"    {kind}_temp_path {folder}/{kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.config = folder / "nginx.conf"
        # As root (the tests here), nginx's workers would drop to `nobody`, who cannot enter pytest's folders.
        user = "user root;" if os.geteuid() == 0 else ""
        self.config.write_text(f"""
{user}
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {folder}/access.log;
{temp}
{snippet}
}}
""")
        self.error_log = folder / "error.log"
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        checked = subprocess.run([nginx, "-t", "-c", str(self.config), "-g", "daemon off;"], capture_output=True,
                                 text=True, check=False)
        assert checked.returncode == 0, checked.stderr
        self.process = subprocess.Popen([nginx, "-c", str(self.config), "-g", "daemon off;"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read().decode()
            try:
                requests.get(self.url + "/vd/livez", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("nginx did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, tiny_model_dir):
    """The service as `make run` starts it, trusting one proxy hop, behind nginx on /vd/."""
    folder = tmp_path_factory.mktemp("proxied")
    with ready_gunicorn(folder / "service", {"SVD_MODEL": str(tiny_model_dir), "TRUSTED_PROXIES": "1"}) as service:
        nginx = Nginx(folder / "nginx", service.port)
        yield nginx
        nginx.stop()


def test_the_snippet_is_what_the_docs_say(proxied):
    snippet = nginx_snippet()
    assert "proxy_read_timeout 660s" in snippet and "client_max_body_size 25m" in snippet
    assert "X-Forwarded-Prefix /vd" in snippet and "http_503" in snippet


def test_health_sync_generation_and_the_contract_through_nginx(proxied):
    assert requests.get(proxied.url + "/vd/health", timeout=10).json()["status"] == "ok"
    assert requests.get(proxied.url + "/vd", timeout=10, allow_redirects=False).headers["Location"].endswith("/vd/")
    response = requests.post(proxied.url + "/vd/generate", files={"image": ("input.png", image_bytes())},
                             data={k: str(v) for k, v in dict(SMALL, fps=6).items()}, timeout=120)
    assert response.status_code == 200 and response.headers["Content-Type"] == "video/mp4"
    frames, fps = decode_video(response.content, "mp4")
    assert frames.shape[0] == int(SMALL["num_frames"]) and fps == 6
    document = requests.get(proxied.url + "/vd/openapi.json", timeout=10).json()
    assert document["servers"] == [{"url": "/vd"}]
    # nginx's own limit is raised above MAX_UPLOAD_MB: a 21 MiB body reaches the service and gets its JSON 413,
    # every time (the service answers from Content-Length, then reads on until nginx has sent the rest: closing
    # with unread bytes resets the connection, and nginx answers 502 without the service's answer)
    body = b"\0" * (21 << 20)
    for _ in range(5):
        too_big = requests.post(proxied.url + "/vd/generate", files={"image": ("big.png", body)}, timeout=60)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"


def test_async_urls_carry_the_prefix_and_events_stream_through_nginx(proxied):
    """Every URL the service answers with is under /vd/, and progress events arrive while the task runs (nginx
    buffers proxied answers unless told not to: the service sends `X-Accel-Buffering: no`)."""
    accepted = requests.post(proxied.url + "/vd/generate", files={"image": ("input.png", image_bytes())},
                             data={k: str(v) for k, v in dict(SMALL, num_inference_steps=60).items()},
                             headers={"Prefer": "respond-async"}, timeout=30)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert accepted.headers["Location"] == f"/vd/status/{body['task_id']}" == body["status_url"]
    events, running_seen = [], False
    with requests.get(proxied.url + body["status_url"] + "/events", stream=True, timeout=60) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        for line in stream.iter_lines(decode_unicode=True):
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            events.append(event)
            if event["status"] == "started" and not running_seen:
                # This event came through nginx while the task still runs: not held back until the end.
                running_seen = True
                status = requests.get(proxied.url + body["status_url"], timeout=10).json()
                assert status["status"] == "started", status
            if event["status"] in ("finished", "failed", "canceled"):
                break
    assert running_seen and events[-1]["status"] == "finished", events
    assert events[-1]["result_url"] == f"/vd/results/{body['task_id']}"
    video = requests.get(proxied.url + events[-1]["result_url"], timeout=30)
    assert video.status_code == 200 and decode_video(video.content, "mp4")[0].shape[0] == int(SMALL["num_frames"])


def test_the_page_works_under_the_prefix_in_a_browser(proxied):
    """Chromium loads /vd/: its script and styles, and its first call (the parameter schema), all under /vd/."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            fetched = []
            page.on("response", lambda response: fetched.append((response.url, response.status)))
            page.goto(proxied.url + "/vd/")
            expect(page.get_by_label("Motion amount", exact=True)).to_be_visible()  # built from /vd/params
        finally:
            browser.close()
    paths = {url.removeprefix(proxied.url): status for url, status in fetched}
    assert all(path.startswith("/vd/") for path in paths), paths
    assert all(status == 200 for status in paths.values()), paths
    assert any(path.endswith(".js") for path in paths) and "/vd/params" in paths, paths
