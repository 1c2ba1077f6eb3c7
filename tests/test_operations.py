"""What an operator relies on: metrics, logs, auth, CORS, proxies, limits and timeouts."""

from __future__ import annotations

import io
import json
import re
import logging
import time

import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import SMALL, image_bytes, promtool_problems, upload
from pipeline import VideoGenerator
from test_async import LONG, ended, poll, running, submit


def metric(client, line_start: str) -> float:
    text = client.get("/metrics", headers={"X-API-Key": "k1"}).get_data(as_text=True)
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in metrics:\n{text}")


def test_metrics_count_tasks_time_them_and_report_live_state(client):
    assert client.post("/generate", data=upload(image_bytes(), **SMALL)).status_code == 200
    assert submit(client, **dict(SMALL, num_frames=99)).status_code == 422
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    assert metric(client, 'video_diffusion_tasks_created_total{mode="sync"}') == 1
    assert metric(client, "video_diffusion_tasks_completed_total") == 1
    assert metric(client, "video_diffusion_generation_seconds_count") == 1
    assert metric(client, "video_diffusion_generation_seconds_sum") > 0
    assert metric(client, "video_diffusion_encoding_seconds_count") == 1
    assert metric(client, "video_diffusion_queue_wait_seconds_count") == 1
    assert metric(client, "video_diffusion_model_ready") == 1
    assert metric(client, "video_diffusion_queue_depth") == 0
    assert metric(client, 'video_diffusion_http_requests_total{method="POST",route="/generate",status="200"}') == 1
    assert promtool_problems(response.get_data(as_text=True)) == ""
    assert not re.search(r"^\w+_created[{ ]", response.get_data(as_text=True), re.M)  # off: twice the series
    assert metric(client, 'video_diffusion_http_requests_total{method="POST",route="/generate",status="422"}') == 1


def test_metrics_count_failures_by_code_and_cancellations(make_app, generator):
    class RaisesOom:
        scheduler = None  # a pipeline's part that VideoGenerator hands the request's generator to

        def __call__(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")

    client = make_app(load=lambda _s: VideoGenerator(RaisesOom(), generator.model, "cpu", "float32")).test_client()
    poll(client, submit(client, **SMALL).json["task_id"], ended)
    assert metric(client, 'video_diffusion_tasks_failed_total{code="out_of_memory"}') == 1
    assert metric(client, 'video_diffusion_tasks_created_total{mode="async"}') == 1


def test_each_app_has_its_own_registry(make_app):
    first, second = make_app().test_client(), make_app().test_client()
    first.post("/generate", data=upload(image_bytes(), **SMALL))
    assert metric(first, "video_diffusion_tasks_completed_total") == 1
    assert metric(second, "video_diffusion_tasks_completed_total") == 0


def test_request_ids_are_echoed_or_made_and_logged(client, caplog):
    caplog.set_level(logging.INFO)
    given = client.post("/generate", data=upload(image_bytes(), **SMALL), headers={"X-Request-Id": "abc-123"})
    assert given.headers["X-Request-Id"] == "abc-123"
    made = client.get("/status/" + "0" * 32, headers={"X-Request-Id": "bad id with spaces"})
    assert len(made.headers["X-Request-Id"]) == 32 and made.headers["X-Request-Id"] != "bad id with spaces"
    lines = [r for r in caplog.records if r.name == "video_diffusion.access"]
    assert any(r.request_id == "abc-123" and r.status == 200 and r.task_id == given.headers["X-Task-Id"]
               for r in lines)
    task_lines = [r.getMessage() for r in caplog.records if r.name == "video_diffusion.tasks"]
    assert any("queued" in m for m in task_lines) and any("finished" in m and "generation" in m for m in task_lines)


def test_json_logs_are_one_object_per_line():
    from video_diffusion.telemetry import _JsonFormatter

    record = logging.LogRecord("server", logging.INFO, __file__, 1, "POST /generate %s", (200,), None)
    record.request_id, record.task_id = "r1", "t1"
    entry = json.loads(_JsonFormatter().format(record))
    assert entry["message"] == "POST /generate 200" and entry["request_id"] == "r1" and entry["task_id"] == "t1"
    assert entry["level"] == "info" and entry["time"].endswith("Z")


def test_keys_and_image_bytes_never_reach_the_logs(make_app, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_app(API_KEY="s3cret-key-1,s3cret-key-2").test_client()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "IMAGE-BYTES-MARKER")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG", pnginfo=info)
    client.post("/generate", data=upload(buffer.getvalue(), **SMALL), headers={"X-API-Key": "s3cret-key-2"})
    client.get("/metrics", headers={"Authorization": "Bearer wrong-s3cret"})
    logged = caplog.text
    assert "s3cret" not in logged and "IMAGE-BYTES-MARKER" not in logged


def test_each_api_key_is_a_tenant_and_the_admin_key_sees_every_task(make_app):
    """Before: with API_KEY=a,b, key b could read, stream, download and cancel a's tasks given the id, and a
    result-cache hit told b that a had made the same request."""
    client = make_app(API_KEY="key-a,key-b", ADMIN_API_KEY="key-admin").test_client()
    a, b, admin = ({"X-API-Key": k} for k in ("key-a", "key-b", "key-admin"))
    made = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=91), headers=a)
    task_id = made.headers["X-Task-Id"]
    for path in (f"/status/{task_id}", f"/status/{task_id}/events", f"/results/{task_id}"):
        other = client.get(path, headers=b)
        assert other.status_code == 404 and other.json["error"]["code"] == "not_found", path
        assert client.get(path, headers=a).status_code == 200, path
        assert client.get(path, headers=admin).status_code == 200, path
    assert client.delete(f"/tasks/{task_id}", headers=b).status_code == 404
    same = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=91), headers=b)
    assert same.headers["X-Cache"] == "miss"  # b's own video, not a's
    again = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=91), headers=a)
    assert again.headers["X-Cache"] == "hit" and again.data == made.data
    assert client.delete(f"/tasks/{same.headers['X-Task-Id']}", headers=admin).status_code == 409  # ended: seen


def test_livez_always_answers(client):
    assert client.get("/livez").json == {"status": "alive"}


def test_api_keys(make_app):
    client = make_app(API_KEY="k1, k2").test_client()
    for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
        response = client.get(f"/status/{'0' * 32}", headers=headers)
        assert response.status_code == 401 and response.json["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(f"/status/{'0' * 32}", headers={"Authorization": "Bearer k1"}).status_code == 404
    assert client.get(f"/status/{'0' * 32}", headers={"X-API-Key": "k2"}).status_code == 404
    assert client.post("/generate", data=upload(image_bytes(), **SMALL)).status_code == 401
    assert client.get("/health").status_code == 200 and client.get("/livez").status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/openapi.json").status_code == 401
    public = make_app(API_KEY="k1", METRICS_PUBLIC="true").test_client()
    assert public.get("/metrics").status_code == 200


def test_cors_only_for_listed_origins(make_app):
    closed = make_app().test_client()
    assert "Access-Control-Allow-Origin" not in closed.get("/livez", headers={"Origin": "https://a.example"}).headers
    client = make_app(CORS_ORIGINS="https://a.example, https://b.example", API_KEY="k1").test_client()
    allowed = client.get("/livez", headers={"Origin": "https://b.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://b.example"
    assert "X-Seed" in allowed.headers["Access-Control-Expose-Headers"] and "Origin" in allowed.headers["Vary"]
    assert "Access-Control-Allow-Origin" not in client.get("/livez", headers={"Origin": "https://evil.example"}).headers
    preflight = client.options("/generate", headers={"Origin": "https://a.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200  # no key asked: browsers send none on a preflight
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]


def test_forwarded_headers_count_only_behind_trusted_proxies(make_app, caplog):
    caplog.set_level(logging.INFO)
    headers = {"Prefer": "respond-async", "X-Forwarded-Prefix": "/vd", "X-Forwarded-For": "203.0.113.9"}
    direct = make_app().test_client()
    response = direct.post("/generate", data=upload(image_bytes(), **SMALL), headers=headers)
    assert response.headers["Location"].startswith("/status/")
    assert "client=203.0.113.9" not in caplog.text
    proxied = make_app(TRUSTED_PROXIES="1").test_client()
    response = proxied.post("/generate", data=upload(image_bytes(), **SMALL), headers=headers)
    assert response.headers["Location"].startswith("/vd/status/")
    assert "client=203.0.113.9" in caplog.text


def test_form_parts_and_form_memory_are_capped(client):
    too_many = {f"f{i}": "1" for i in range(100)}
    assert client.post("/generate", data={**upload(image_bytes()), **too_many}).status_code == 413
    big_field = client.post("/generate", data={**upload(image_bytes()), "seed": "1" * (2 * 1024 * 1024)})
    assert big_field.status_code == 413 and big_field.json["error"]["code"] == "payload_too_large"


def test_parameter_caps_narrow_the_ranges(make_app):
    client = make_app(MAX_DIMENSION="128", MAX_STEPS="4").test_client()
    wide = client.post("/generate", data=upload(image_bytes(), width=256, height=128))
    assert wide.status_code == 422 and wide.json["error"]["message"] == "`width` must be 64 to 128, a multiple of 8, got '256'"
    steps = client.post("/generate", data=upload(image_bytes(), num_inference_steps=5))
    assert steps.status_code == 422 and steps.json["error"]["field"] == "num_inference_steps"
    source = client.post("/generate", data=upload(image_bytes(size=(400, 200)), sizing="source"))
    assert source.status_code == 422 and source.json["error"]["field"] == "sizing"
    document = client.get("/openapi.json").json
    form = document["paths"]["/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["width"]["maximum"] == 128 and form["properties"]["num_inference_steps"]["maximum"] == 4


def test_queue_timeout_fails_a_waiting_task_that_never_runs(make_app):
    client = make_app(QUEUE_TIMEOUT="1").test_client()
    holder = submit(client, **LONG).json["task_id"]
    poll(client, holder, running)
    waiting = submit(client, **SMALL).json["task_id"]
    final = poll(client, waiting, ended, timeout=10)
    assert final["status"] == "failed" and final["error"]["code"] == "queue_timeout" and final["started_at"] is None
    client.delete(f"/tasks/{holder}")
    assert metric(client, 'video_diffusion_tasks_failed_total{code="queue_timeout"}') == 1


def test_job_timeout_stops_a_long_generation_and_the_next_runs(make_app):
    client = make_app(JOB_TIMEOUT="1").test_client()
    long_task = submit(client, **LONG).json["task_id"]
    final = poll(client, long_task, ended, timeout=20)
    assert final["status"] == "failed" and final["error"]["code"] == "timeout"
    assert final["progress"]["step"] < 100
    assert client.post("/generate", data=upload(image_bytes(), **SMALL)).status_code == 200


def test_sync_timeout_answers_504_with_the_task_id_and_the_task_goes_on(make_app):
    client = make_app(SYNC_TIMEOUT="1").test_client()
    started = time.monotonic()
    response = client.post("/generate", data=upload(image_bytes(), **dict(SMALL, num_inference_steps=60)))
    assert response.status_code == 504 and time.monotonic() - started < 5
    body = response.json
    assert body["error"]["code"] == "sync_timeout" and body["result_url"] == f"/results/{body['task_id']}"
    final = poll(client, body["task_id"], ended, timeout=60)
    assert final["status"] == "finished"
    assert client.get(body["result_url"]).status_code == 200


def test_under_a_path_prefix_every_url_the_service_emits_stays_under_it(make_app):
    """Behind `location /vd/` with X-Forwarded-Prefix: before, the page loaded /static/app.js and called /params
    and /generate by absolute path (404 under /vd/), and openapi.json had no `servers`."""
    import re
    from urllib.parse import urljoin

    client = make_app(TRUSTED_PROXIES="1").test_client()
    proxied = {"X-Forwarded-Prefix": "/vd", "X-Forwarded-Host": "videos.example.com", "X-Forwarded-Proto": "https"}
    page = client.get("/", headers=proxied).get_data(as_text=True)
    script = client.get("/static/app.js").get_data(as_text=True)
    base = "https://videos.example.com/vd/"
    urls = re.findall(r'(?:href|src)="([^"]+)"', page)
    urls += re.findall(r'(?:api|fetch)\((?:"|`)([^"`$]+)', script)
    assert urls and all(urljoin(base, u).startswith(base) for u in urls), urls
    for url in urls:  # what the proxy forwards, with the prefix stripped, is served (ids filled in at run time)
        path = "/" + urljoin(base, url)[len(base):]
        if not path.endswith("/"):
            assert client.get(path).status_code in (200, 405), path  # 405: POST /generate
    accepted = client.post("/generate", data=upload(image_bytes(), **SMALL),
                           headers={**proxied, "Prefer": "respond-async"})
    assert accepted.headers["Location"].startswith("/vd/status/") and accepted.json["status_url"].startswith("/vd/")
    assert client.get("/openapi.json", headers=proxied).json["servers"] == [{"url": "/vd"}]


def test_public_url_must_be_an_absolute_http_url():
    from config import ConfigError, load_settings

    assert load_settings({"PUBLIC_URL": "https://videos.example.com/vd/"}, dotenv_path=None).public_url == \
        "https://videos.example.com/vd"
    for bad in ("videos.example.com/vd", "ftp://x/vd", "https:///vd", "https://x/vd?a=1"):
        with pytest.raises(ConfigError, match="^PUBLIC_URL=.*must be an absolute http\\(s\\) URL"):
            load_settings({"PUBLIC_URL": bad}, dotenv_path=None)
