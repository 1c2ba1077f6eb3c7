"""Model choice and loading, the loading and failed states, and out-of-memory handling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import SMALL, image_bytes, settings_for, upload, wait_ready

from config import load_settings
from pipeline import VideoGenerator, build_tiny_pipeline, describe_model, load_generator
from server import create_app
from video_diffusion.models.contract import Generator, ModelInfo, check_generator


def settings(**env):
    return load_settings(env, dotenv_path=None)


@pytest.mark.parametrize("env,gpu,name,repo,frames", [
    ({}, False, "tiny", None, 14),
    ({}, True, "svd-xt", "stabilityai/stable-video-diffusion-img2vid-xt", 25),
    ({"SVD_MODEL": "svd"}, True, "svd", "stabilityai/stable-video-diffusion-img2vid", 14),
    ({"SVD_MODEL": "svd-xt-1-1"}, False, "svd-xt-1-1", "stabilityai/stable-video-diffusion-img2vid-xt-1-1", 25),
    ({"SVD_MODEL": "me/my-svd"}, True, "me/my-svd", "me/my-svd", 25),
    ({"SVD_MODEL": "svd", "VIDEO_FRAMES": "20"}, True, "svd", "stabilityai/stable-video-diffusion-img2vid", 20),
    ({"SVD_MODEL": "animatelcm-svd-xt"}, True, "animatelcm-svd-xt", "stabilityai/stable-video-diffusion-img2vid-xt",
     25),
])
def test_svd_model_names(env, gpu, name, repo, frames):
    model = describe_model(settings(**env), gpu=gpu)
    assert (model.name, model.source, model.defaults["num_frames"]) == (name, repo, frames)
    assert model.noise == (name == "tiny")


def test_a_local_folder_is_named_by_its_own_name_not_its_path(tmp_path):
    folder = tmp_path / "studio-svd-xt"
    folder.mkdir()
    model = describe_model(load_settings({"SVD_MODEL": str(folder)}, dotenv_path=None), gpu=True)
    assert (model.name, model.source, model.label) == ("studio-svd-xt", str(folder), "studio-svd-xt")
    # No scheduler config to go by: SVD's own defaults and no step limit of a consistency sampler.
    assert (model.max_steps, model.defaults["num_inference_steps"], model.defaults["max_guidance_scale"]) == (
        None, 25, 3.0)


def test_video_size_settings_are_the_defaults():
    model = describe_model(settings(SVD_MODEL="svd", VIDEO_WIDTH="512", VIDEO_HEIGHT="320"), gpu=True)
    assert (model.defaults["width"], model.defaults["height"]) == (512, 320)


def test_a_saved_tiny_folder_loads_back_identically_and_is_known_as_noise(generator, tiny_model_dir):
    assert generator.model.noise and generator.model.source == str(tiny_model_dir)
    assert generator.model.label == "tiny (random weights: the output is noise)"  # its path is nobody's business
    assert "random weights" in generator.model.label
    built = build_tiny_pipeline().unet.state_dict()
    loaded = generator.pipe.unet.state_dict()
    assert built.keys() == loaded.keys()
    assert all(torch.equal(built[key], loaded[key]) for key in built)


def test_health_is_503_loading_until_the_model_is_ready(tmp_path, generator):
    release = threading.Event()

    def slow_load(_settings):
        release.wait(10)
        return generator

    app = create_app(settings_for(tmp_path), load=slow_load)
    client = app.test_client()
    try:
        response = client.get("/health")
        assert response.status_code == 503 and response.json["status"] == "loading"
        busy = client.post("/generate", data=upload(image_bytes(), **SMALL))
        assert busy.status_code == 503 and busy.json["error"]["code"] == "model_not_ready"
        assert int(busy.headers["Retry-After"]) > 0
        release.set()
        assert wait_ready(client)["status"] == "ok"
        assert client.post("/generate", data=upload(image_bytes(), **SMALL)).status_code == 200
    finally:
        app.extensions["video_diffusion"].backend.stop()


@pytest.mark.parametrize("env,needle", [
    ({"SVD_MODEL": "/nonexistent/svd-folder"}, "SVD_MODEL names neither a model folder on this machine"),
    ({"SVD_MODEL": "stabilityai/stable-video-diffusion-img2vid-xt"},
     "the model could not be downloaded: no access to the model hub"),
    ({"SVD_MODEL": "svd-xt"}, "set HF_TOKEN for gated models, or set SVD_MODEL to a local folder; this machine has "
                              "no GPU: a real model would take many minutes per video here"),
    ({"SVD_MODEL": "animatelcm-svd-xt"}, "the model could not be downloaded: no access to the model hub"),
    ({"SVD_MODEL": "tiny", "SVD_OFFLOAD": "model"}, "SVD_OFFLOAD=model needs a CUDA device"),
    ({"SVD_MODEL": "tiny-wan", "SVD_OFFLOAD": "group"}, "SVD_OFFLOAD=group needs a CUDA device"),
    ({"SVD_MODEL": "tiny", "VAE_TILING": "true"}, "VAE_TILING applies to Wan and LTX-Video; SVD decodes in chunks"),
    ({"SVD_MODEL": "tiny", "SVD_DEVICE": "cuda"}, "no cuda device"),
])
def test_a_failed_load_keeps_the_process_up_and_says_why_but_not_where(tmp_path, env, needle, monkeypatch):
    if "/" in env["SVD_MODEL"] and not env["SVD_MODEL"].startswith("/"):
        # A repo id: huggingface_hub retries a failed name lookup for 23 s (1+2+4+8+8) before it gives up; offline
        # mode fails the same way at once. (animatelcm-svd-xt below meets the real unreachable hub.)
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    app = create_app(settings_for(tmp_path, **env), load=load_generator)
    client = app.test_client()
    try:
        health = wait_ready(client)
        assert health["status"] == "failed" and health["error"]["code"] == "model_load_failed"
        assert needle in health["error"]["message"]
        assert client.get("/health").status_code == 503
        response = client.post("/generate", data=upload(image_bytes(), **SMALL))
        assert response.status_code == 503 and needle in response.json["error"]["message"]
        for body in (client.get("/health").get_data(as_text=True), response.get_data(as_text=True)):
            assert "/nonexistent" not in body and "Error" not in body and str(tmp_path) not in body
    finally:
        app.extensions["video_diffusion"].backend.stop()


class RaisesOomOnce:
    """Stands in for the pipeline: the first call runs out of GPU memory, later calls run the real one."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):  # its scheduler, its components: the real pipeline's
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(*args, **kwargs)


def test_out_of_memory_fails_only_that_request(make_app, generator):
    raises_oom = VideoGenerator(RaisesOomOnce(generator.pipe), generator.model, "cpu", "float32")
    client = make_app(load=lambda _settings: raises_oom).test_client()
    failed = client.post("/generate", data=upload(image_bytes(), **SMALL))
    assert failed.status_code == 507
    assert failed.json["error"]["code"] == "out_of_memory"
    assert "Traceback" not in failed.get_data(as_text=True)
    assert client.get("/health").status_code == 200
    assert client.post("/generate", data=upload(image_bytes(), **SMALL)).status_code == 200


def test_generator_output_is_uint8_frames_of_the_asked_size(generator):
    from PIL import Image

    params = {"num_frames": 14, "num_inference_steps": 1, "fps": 6, "motion_bucket_id": 127,
              "noise_aug_strength": 0.02, "decode_chunk_size": 4, "min_guidance_scale": 1.0,
              "max_guidance_scale": 3.0, "seed": 1}
    phases = []
    frames = generator.generate(Image.new("RGB", (128, 64)), params, lambda *p: phases.append(p))
    assert frames.dtype == np.uint8 and frames.shape == (14, 64, 128, 3)
    assert phases == [("denoising", 0, 1), ("decoding", 1, 1)]


class NoWarmUp:
    """A generator one member short of the contract: everything but warm_up."""

    model = ModelInfo(name="incomplete", source=None, noise=True)
    device, dtype, needs_warm_up = "cpu", "float32", False

    def generate(self, image, params, progress):
        return np.zeros((params["num_frames"], params["height"], params["width"], 3), np.uint8)

    def describe(self):
        return {"model": self.model.label, "noise": True, "device": "cpu", "dtype": "float32"}

    def memory_stats(self):
        return {}


def test_the_loaded_generator_keeps_the_contract(generator):
    assert check_generator(generator) is generator and isinstance(generator, Generator)


def test_a_generator_that_breaks_the_contract_fails_when_it_loads(tmp_path, caplog):
    app = create_app(settings_for(tmp_path), load=lambda _settings: NoWarmUp())
    try:
        health = wait_ready(app.test_client())
        assert health["status"] == "failed" and health["error"]["code"] == "model_load_failed"
        assert "NoWarmUp is not a Generator: it lacks warm_up" in caplog.text  # said in the log, by name
        assert "warm_up" not in health["error"]["message"]  # the public answer says what failed, not where
        refused = app.test_client().post("/generate", data=upload(image_bytes(), **SMALL))
        assert refused.status_code == 503 and refused.json["error"]["code"] == "model_not_ready"
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_an_empty_cuda_visible_devices_counts_as_unset(tmp_path, monkeypatch, tiny_model_dir):
    """A container handed CUDA_VISIBLE_DEVICES= would see no GPU: empty means unset, as for every setting."""
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    load_generator(load_settings({"SVD_MODEL": str(tiny_model_dir)}, dotenv_path=None))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
