"""The OpenAPI document: complete, and the running service keeps to it under generated and fuzzed input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from urllib.parse import quote

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from conftest import SMALL, Gunicorn, image_bytes, lane_job, lane_result, settings_for, upload, wait_ready
from server import create_app

# Bounded cost: every generation the fuzzer asks for is 64x64 and at most 2 steps, so it answers in well
# under a second; the caps narrow the document too, so no valid request is refused.
FUZZ_ENV = {"MAX_DIMENSION": "64", "MAX_STEPS": "2", "MAX_QUEUE": "100000", "SYNC_TIMEOUT": "120"}


@lane_job("schemathesis")
def fuzz_the_live_service(folder, tiny_model_dir):
    """schemathesis against `make run`'s gunicorn on the tiny model: (exit code, stdout, stderr)."""
    server = Gunicorn(folder, {"SVD_MODEL": str(tiny_model_dir), **FUZZ_ENV})
    try:
        server.wait_ready()
        # positive_data_acceptance is left out: no schema can say which bytes decode as an image, so
        # schema-valid uploads are rightly refused with 415.
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
             # 10 examples per operation: with operationIds on every route schemathesis also infers 13 links to
             # walk, and 20 took 70 s of make test's budget.
             "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "150",
             "--exclude-checks", "positive_data_acceptance", "--output-truncate", "true"],
            cwd=folder, capture_output=True, text=True, timeout=600, check=False)
    finally:
        server.stop()
    return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
@pytest.mark.lane("schemathesis")
def test_schemathesis_finds_no_server_error_and_no_departure_from_the_document():
    code, stdout, stderr = lane_result("schemathesis")
    assert code == 0, stdout[-6000:] + stderr[-2000:]
    assert " passed" in stdout


def test_the_document_lists_every_route(client):
    document = client.get("/openapi.json").json
    assert document["openapi"].startswith("3.1")
    routes = {rule.rule.replace("<path:task_id>", "{task_id}").replace("<task_id>", "{task_id}") for rule in client.application.url_map.iter_rules()
              if rule.endpoint.startswith("api.")}
    assert routes == set(document["paths"])
    form = document["paths"]["/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"image", "motion_bucket_id", "fps", "num_frames", "decode_chunk_size",
                                       "num_inference_steps", "noise_aug_strength", "min_guidance_scale",
                                       "max_guidance_scale", "seed", "width", "height", "sizing", "format", "loop",
                                       "output_fps", "segments", "cache_interval", "webhook", "webhook_events", "model"}
    assert form["properties"]["fps"] == {"description": form["properties"]["fps"]["description"], "type": "integer",
                                         "minimum": 1, "maximum": 30, "default": 6}


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, generator):
    app = create_app(settings_for(tmp_path_factory.mktemp("fuzz"), **FUZZ_ENV), load=lambda _s: generator)
    client = app.test_client()
    wait_ready(client)
    yield client
    app.extensions["video_diffusion"].backend.stop()


FUZZ = settings(max_examples=40, deadline=20_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
VALID = [image_bytes(size=(40, 30)), image_bytes(size=(40, 30), fmt="JPEG"), image_bytes(size=(40, 30), fmt="WEBP")]


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_an_image_get_a_4xx(fuzz_client, data):
    response = fuzz_client.post("/generate", data=upload(data, **SMALL))
    assert 400 <= response.status_code < 500, response.json
    assert response.json["error"]["code"] in ("missing_image", "invalid_image", "unsupported_media_type")


@FUZZ
@given(original=st.sampled_from(VALID), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                      max_size=8), cut=st.integers(0, 10_000))
def test_mutated_images_are_videos_or_4xx_never_5xx(fuzz_client, original, flips, cut):
    data = bytearray(original)
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    response = fuzz_client.post("/generate", data=upload(data, **dict(SMALL, num_inference_steps=1)))
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.get_data()[:300]


@FUZZ
@given(task_id=st.text(max_size=80))
def test_any_task_id_is_404_never_5xx(fuzz_client, task_id):
    quoted = quote(task_id, safe="")
    for method, path in (("get", "/status/"), ("get", "/results/"), ("delete", "/tasks/")):
        response = getattr(fuzz_client, method)(path + quoted)
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found"


@pytest.mark.slow
def test_a_client_generated_from_the_document_uploads_reads_a_task_and_downloads_the_video(gunicorn_server, tmp_path):
    """openapi-python-client, its code used unmodified. Before: `image` (no `format: binary`) was typed `str` and
    sent as a text part (400 missing_image), and the 200 answers were parsed as JSON (`.json()` on MP4 bytes)."""
    import importlib
    import io
    import json
    import time

    import requests

    from conftest import decode_video

    document = requests.get(gunicorn_server.url + "/openapi.json", timeout=10).json()
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    generator = Path(sys.executable).with_name("openapi-python-client")
    made = subprocess.run([str(generator), "generate", "--path", str(tmp_path / "openapi.json"), "--meta", "none",
                           "--output-path", str(tmp_path / "vd_client")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    sys.path.insert(0, str(tmp_path))
    try:
        client_module = importlib.import_module("vd_client")
        api = type("api", (), {name: importlib.import_module(f"vd_client.api.default.{name}")
                               for name in ("generate", "get_status", "get_results", "get_params")})
        body_module = importlib.import_module("vd_client.models.generate_files_body")
        types = importlib.import_module("vd_client.types")
        prefer = importlib.import_module("vd_client.models.generate_prefer").GeneratePrefer
        client = client_module.Client(base_url=gunicorn_server.url, timeout=120)

        def body():
            return body_module.GenerateFilesBody(
                image=types.File(payload=io.BytesIO(image_bytes()), file_name="in.png", mime_type="image/png"),
                width=64, height=64, num_inference_steps=1, num_frames=14)

        video = api.generate.sync(client=client, body=body())
        assert isinstance(video, types.File), video
        frames, fps = decode_video(video.payload.read(), "mp4")
        assert frames.shape == (14, 64, 64, 3) and fps == 6

        task = api.generate.sync(client=client, body=body(), prefer=prefer.RESPOND_ASYNC)
        assert task.task_id and task.status.value in ("queued", "started", "finished"), task
        deadline = time.monotonic() + 60
        while (status := api.get_status.sync(task.task_id, client=client)).status.value != "finished":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        result = api.get_results.sync(task.task_id, client=client)
        assert isinstance(result, types.File) and decode_video(result.payload.read(), "mp4")[0].shape[0] == 14
        params = api.get_params.sync(client=client)
        assert any(p.name == "num_frames" for p in params.params)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "vd_client" or m.startswith("vd_client.")]:
            del sys.modules[name]
