"""Work the UNet need not redo: one-token cross-attention (exact) and deep-feature reuse (`cache_interval`),
per-request state, and torch.compile with a warm-up at start-up."""

from __future__ import annotations

import contextlib
import io
import threading
import zipfile

import numpy as np
import torch
from diffusers.models.resnet import SpatioTemporalResBlock
from PIL import Image

import pipeline
from config import load_settings
from conftest import SMALL, image_bytes, settings_for, upload, wait_ready
from pipeline import build_tiny_pipeline, load_generator
from server import create_app
from video_diffusion.models.speedups import OneTokenCrossAttention


def latents(pipe, seed: int = 3, steps: int = 6, color=(200, 40, 40)) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(Image.new("RGB", (64, 64), color), width=64, height=64, num_frames=14, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed), output_type="latent").frames


@contextlib.contextmanager
def resblock_calls(unet):
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for m in unet.modules() if isinstance(m, SpatioTemporalResBlock)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def run(generator, interval: int, **kwargs) -> torch.Tensor:
    generator.deep_cache.reset(interval)
    return latents(generator.pipe, **kwargs)


def test_one_token_cross_attention_equals_the_full_computation(generator):
    processors = [m for m in generator.pipe.unet.modules() if isinstance(getattr(m, "processor", None),
                                                                        OneTokenCrossAttention)]
    assert len(processors) == 8  # every cross-attention of the tiny UNet (spatial and temporal)
    fast = run(generator, 1)
    for module in processors:
        module.processor, module.saved = module.processor.fallback, module.processor
    try:
        full = run(generator, 1)
    finally:
        for module in processors:
            module.processor = module.saved
    assert (fast - full).abs().max().item() <= 1e-5


def test_cache_interval_1_is_the_plain_pipeline_and_larger_ones_skip_deep_blocks(generator):
    plain = build_tiny_pipeline()  # the same weights, with no reuse of any kind installed
    plain.set_progress_bar_config(disable=True)
    reference = latents(plain)
    counts, errors = {}, {}
    for interval in (1, 2, 3):
        with resblock_calls(generator.pipe.unet) as calls:
            out = run(generator, interval)
        counts[interval] = calls[0]
        errors[interval] = ((out - reference).norm() / reference.norm()).item()
    assert errors[1] <= 1e-5  # within float rounding of the pipeline without any reuse
    assert counts[1] > counts[2] > counts[3]  # 48 > 33 > 28 ResBlock calls in 6 steps
    assert 0 < errors[2] < errors[3] < 0.5


def test_no_request_leaks_into_the_next(make_app, tiny_model_dir):
    """Image A then B with caching on gives exactly what B alone gives on a fresh server."""
    client = make_app(SVD_CACHE_INTERVAL="3").test_client()
    params = {**SMALL, "num_inference_steps": 5, "format": "frames"}
    client.post("/generate", data=upload(image_bytes(color=(0, 200, 0)), seed=1, **params))
    after_a = client.post("/generate", data=upload(image_bytes(color=(200, 0, 200)), seed=2, **params)).data
    fresh = load_generator(load_settings({"SVD_MODEL": str(tiny_model_dir)}, dotenv_path=None))
    alone = make_app(load=lambda settings: fresh, SVD_CACHE_INTERVAL="3").test_client()
    b_alone = alone.post("/generate", data=upload(image_bytes(color=(200, 0, 200)), seed=2, **params)).data
    assert frames_of(after_a).tobytes() == frames_of(b_alone).tobytes()


def frames_of(data: bytes) -> np.ndarray:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n)))) for n in archive.namelist()])


def test_cache_interval_is_a_parameter_with_the_servers_default(make_app):
    client = make_app(SVD_CACHE_INTERVAL="2").test_client()
    (param,) = [p for p in client.get("/params").json["params"] if p["name"] == "cache_interval"]
    assert (param["default"], param["minimum"], param["maximum"]) == (2, 1, 5)
    document = client.get("/openapi.json").json
    assert "cache_interval" in document["paths"]["/generate"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    bad = client.post("/generate", data=upload(image_bytes(), cache_interval=6, **SMALL))
    assert bad.status_code == 422 and bad.json["error"]["field"] == "cache_interval"
    done = client.post("/generate", data=upload(image_bytes(), **SMALL), headers={"Prefer": "respond-async"})
    assert done.json["params"]["cache_interval"] == 2


def test_compile_warms_up_at_start_and_caching_still_works(tmp_path, tiny_model_dir, generator, monkeypatch,
                                                            caplog):
    monkeypatch.setattr(pipeline, "COMPILE_BACKEND", "eager")  # dynamo's tracing without inductor's code generation
    gate = threading.Event()

    def load(settings):
        compiled = load_generator(settings)
        warm_up = compiled.warm_up
        compiled.warm_up = lambda: (gate.wait(30), warm_up())
        load.generator = compiled
        return compiled

    app = create_app(settings_for(tmp_path, SVD_MODEL=str(tiny_model_dir), SVD_COMPILE="true",
                                  SVD_CACHE_INTERVAL="2", VIDEO_WIDTH="64", VIDEO_HEIGHT="64"), load=load)
    client = app.test_client()
    try:
        for _ in range(200):
            health = client.get("/health")
            if health.json["status"] == "warming_up":
                break
            threading.Event().wait(0.05)
        assert health.status_code == 503 and health.json["status"] == "warming_up"
        refused = client.post("/generate", data=upload(image_bytes(), **SMALL))
        assert refused.status_code == 503 and "warming up" in refused.json["error"]["message"]
        gate.set()
        assert wait_ready(client, timeout=300)["status"] == "ok"
        assert "warm-up done" in caplog.text
        compiled = load.generator
        for interval in (1, 2):  # compiled blocks with the reuse around them, against the plain eager blocks
            out = run(compiled, interval)
            assert (out - run(generator, interval)).abs().max().item() <= 1e-4
        with caplog.at_level("INFO"):
            assert client.post("/generate", data=upload(image_bytes(), **{**SMALL, "width": 128})).status_code == 200
        assert "compiling for a new shape: 128x64" in caplog.text
    finally:
        app.extensions["video_diffusion"].backend.stop()
