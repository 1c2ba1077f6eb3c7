"""AnimateLCM-SVD-xt: the consistency sampler (against SVD's own Euler scheduler and the published schedule), the
model's defaults and limits through the service, UNet work per video, seeds, and loading the distilled weights."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image
from safetensors.torch import save_file

import pipeline
from video_diffusion.models.animatelcm import AnimateLCMScheduler
from config import load_settings
from conftest import image_bytes, settings_for, start_worker_processes, upload, wait_ready
from pipeline import describe_model, load_generator, save_tiny_pipeline
from server import create_app

TINY_REQUEST = {"width": "64", "height": "64", "num_frames": "14", "format": "frames"}


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-animatelcm")
    save_tiny_pipeline(path, animatelcm=True)
    return path


@pytest.fixture(scope="module")
def lcm_generator(lcm_dir):
    return load_generator(load_settings({"SVD_MODEL": str(lcm_dir)}, dotenv_path=None))


@pytest.fixture
def lcm_app(tmp_path, lcm_dir, lcm_generator):
    # No result cache: a repeated request must run the sampler again, not be answered with the first video.
    app = create_app(settings_for(tmp_path, SVD_MODEL=str(lcm_dir), RESULT_CACHE="false"),
                     load=lambda settings: lcm_generator)
    wait_ready(app.test_client())
    yield app
    app.extensions["video_diffusion"].backend.stop()


class UNetCalls:
    """The batch size of every UNet call, counted on the UNet itself."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self._handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.batches.append(sample.shape[0])

    def close(self):
        self._handle.remove()


def frames_of(data: bytes) -> np.ndarray:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n)))) for n in archive.namelist()])


# --- the sampler -------------------------------------------------------------------------------------------

def test_levels_are_the_published_karras_points():
    scheduler = AnimateLCMScheduler()
    scheduler.set_timesteps(4)
    # Karras et al.'s schedule over 40 points between 700 and 0.002 (rho 7); 4 steps take every 10th from the top.
    ramp = np.array([0, 10, 20, 30]) / 39
    expected = (700 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 700 ** (1 / 7))) ** 7
    assert np.allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert scheduler.sigmas[0].item() == pytest.approx(700.0) and scheduler.sigmas[-1].item() == 0.0
    assert np.allclose(scheduler.timesteps.numpy(), np.log(expected) / 4, atol=1e-6)  # SVD's c_noise
    assert scheduler.init_noise_sigma == pytest.approx((700**2 + 1) ** 0.5)
    with pytest.raises(ValueError, match="1 to 40"):
        scheduler.set_timesteps(41)


def euler_at(sigma: float) -> EulerDiscreteScheduler:
    """SVD-XT's own scheduler (v-prediction, continuous timesteps), placed at noise level `sigma`."""
    euler = EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous",
                                   use_karras_sigmas=True, sigma_max=700.0, sigma_min=0.002)
    euler.set_timesteps(sigmas=[sigma, 0.0])
    return euler


@pytest.mark.parametrize("sigma", [700.0, 5.0, 0.3])
def test_the_jump_is_svds_own_denoiser_at_that_level(sigma):
    """The distilled UNet keeps SVD's parametrisation: its clean-sample estimate is the one SVD's Euler scheduler
    computes from the same output; after the last level nothing is added."""
    scheduler = AnimateLCMScheduler(sigma_max=sigma)
    scheduler.set_timesteps(1)  # one level, sigma itself, then 0
    euler = euler_at(sigma)
    sample, output = torch.randn(1, 3, 4, 8, 8) * sigma, torch.randn(1, 3, 4, 8, 8)
    assert scheduler.timesteps[0].item() == pytest.approx(euler.timesteps[0].item(), abs=1e-6)
    assert torch.allclose(scheduler.scale_model_input(sample, scheduler.timesteps[0]),
                          euler.scale_model_input(sample, euler.timesteps[0]), rtol=1e-6)
    jumped = scheduler.step(output, scheduler.timesteps[0], sample).prev_sample
    expected = euler.step(output, euler.timesteps[0], sample).pred_original_sample
    assert torch.allclose(jumped, expected, rtol=1e-5, atol=1e-5)


def test_the_noise_between_jumps_comes_from_the_generator_it_is_given():
    scheduler = AnimateLCMScheduler()
    scheduler.set_timesteps(2)
    sample, output = torch.randn(1, 2, 4, 8, 8) * 700, torch.randn(1, 2, 4, 8, 8)
    scheduler.generator = torch.Generator().manual_seed(7)
    torch.manual_seed(123)  # torch's global generator: must play no part
    stepped = scheduler.step(output, scheduler.timesteps[0], sample).prev_sample
    c_skip, c_out = scheduler.scalings(700.0)
    expected = c_skip * sample + c_out * output + scheduler.sigmas[1] * torch.randn(
        sample.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(stepped, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="more often"):
        scheduler.step(output, scheduler.timesteps[1], sample)
        scheduler.step(output, scheduler.timesteps[1], sample)


def test_a_folder_whose_scheduler_is_animatelcm_samples_as_it_does(tmp_path):
    folder = tmp_path / "studio-lcm"
    AnimateLCMScheduler(num_train_timesteps=20).save_pretrained(folder / "scheduler")
    loaded = AnimateLCMScheduler.from_pretrained(folder / "scheduler")
    assert loaded.config.num_train_timesteps == 20 and loaded.config.sigma_max == 700.0
    model = describe_model(load_settings({"SVD_MODEL": str(folder)}, dotenv_path=None), gpu=True)
    assert (model.name, model.max_steps, model.defaults["num_inference_steps"]) == ("studio-lcm", 20, 4)
    assert model.defaults["max_guidance_scale"] == 1.2 and model.unet_weights is None  # the folder has its own UNet


# --- through the service -----------------------------------------------------------------------------------

def test_model_defaults_and_limits_are_the_models(lcm_app, lcm_dir):
    client = lcm_app.test_client()
    assert client.get("/health").json["model"] == "tiny-animatelcm (random weights: the output is noise)"
    params = {p["name"]: p for p in client.get("/params").json["params"]}
    assert params["num_inference_steps"]["effective_default"] == 4
    assert params["num_inference_steps"]["maximum"] == 40  # the sampler's 40 noise levels
    assert params["max_guidance_scale"]["effective_default"] == 1.2
    too_many = client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, num_inference_steps=41))
    assert too_many.status_code == 422 and too_many.json["error"]["field"] == "num_inference_steps"
    assert "1 to 40" in too_many.json["error"]["message"]
    above = client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, min_guidance_scale=1.5))
    assert above.status_code == 422 and above.json["error"]["field"] == "min_guidance_scale"
    assert "the model default, 1.2" in above.json["error"]["message"]


def test_svds_own_defaults_and_limits_stay_as_they_were(client):
    params = {p["name"]: p for p in client.get("/params").json["params"]}
    assert (params["num_inference_steps"]["effective_default"], params["num_inference_steps"]["maximum"]) == (8, 100)
    assert params["max_guidance_scale"]["effective_default"] == 3.0
    above = client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, min_guidance_scale=3.5))
    assert above.status_code == 422 and "the model default, 3.0" in above.json["error"]["message"]
    assert client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, min_guidance_scale=2.5,
                                                num_inference_steps=1)).status_code == 200


def test_unet_runs_once_per_step_batch_2_with_guidance_1_without(lcm_app, lcm_generator):
    client = lcm_app.test_client()
    calls = UNetCalls(lcm_generator.pipe.unet)
    try:
        guided = client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, seed=5))
        assert guided.status_code == 200
        assert calls.batches == [2, 2, 2, 2]  # the defaults: 4 steps, max_guidance_scale 1.2 keeps guidance on
        calls.batches.clear()
        unguided = client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, seed=5, max_guidance_scale=1))
        assert unguided.status_code == 200 and calls.batches == [1, 1, 1, 1]
        calls.batches.clear()
        six = client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, seed=5, num_inference_steps=6))
        assert six.status_code == 200 and calls.batches == [2] * 6
    finally:
        calls.close()
    assert frames_of(guided.data).shape == (14, 64, 64, 3)


def test_the_same_seed_gives_bit_identical_frames(lcm_app):
    client = lcm_app.test_client()
    answers = []
    for seed in (11, 11, 12):
        answers.append(client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, seed=seed)))
        torch.rand(1000)  # the global generator moves on between requests; the video must not
    assert [a.headers["X-Cache"] for a in answers] == ["miss"] * 3  # each one generated
    first, again, other = (frames_of(a.data) for a in answers)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_cache_interval_works_with_the_consistency_sampler(lcm_app, lcm_generator):
    client = lcm_app.test_client()
    cache = lcm_generator.deep_cache
    full_before, cached_before = cache.full_steps, cache.cached_steps
    response = client.post("/generate", data=upload(image_bytes(), **TINY_REQUEST, seed=5, cache_interval=2))
    assert response.status_code == 200
    assert (cache.full_steps - full_before, cache.cached_steps - cached_before) == (2, 2)  # steps 0, 2 in full


# --- the named model: SVD-XT plus the distilled UNet -------------------------------------------------------

def test_animatelcm_svd_xt_names_svd_xt_and_the_distilled_weights():
    model = describe_model(load_settings({"SVD_MODEL": "animatelcm-svd-xt"}, dotenv_path=None), gpu=True)
    assert (model.name, model.source, model.noise) == ("animatelcm-svd-xt",
                                                       "stabilityai/stable-video-diffusion-img2vid-xt", False)
    assert model.unet_weights == ("wangfuyun/AnimateLCM-SVD-xt", "AnimateLCM-SVD-xt-1.1.safetensors")
    assert (model.defaults["num_inference_steps"], model.defaults["max_guidance_scale"], model.max_steps) == (4, 1.2,
                                                                                                             40)
    assert model.defaults["num_frames"] == 25


def distilled_weights(generator, path) -> dict[str, torch.Tensor]:
    """A UNet state dict unlike the base one (every tensor moved), saved as the hub file would be."""
    state = {key: value + 0.01 for key, value in generator.pipe.unet.state_dict().items()}
    save_file(state, path)
    return state


def test_loading_puts_the_distilled_weights_over_the_base_unet(tmp_path, monkeypatch, tiny_model_dir, generator):
    """The base SVD-XT comes from a folder standing in for the hub, the UNet file from a stand-in download."""
    weights = tmp_path / "AnimateLCM-SVD-xt-1.1.safetensors"
    state = distilled_weights(generator, weights)
    asked = []
    monkeypatch.setitem(pipeline.REPOS, "svd-xt", (str(tiny_model_dir), 25))
    monkeypatch.setattr("huggingface_hub.hf_hub_download",
                        lambda repo, name: asked.append((repo, name)) or str(weights))
    loaded = load_generator(load_settings({"SVD_MODEL": "animatelcm-svd-xt"}, dotenv_path=None))
    assert asked == [("wangfuyun/AnimateLCM-SVD-xt", "AnimateLCM-SVD-xt-1.1.safetensors")]
    assert isinstance(loaded.pipe.scheduler, AnimateLCMScheduler)
    unet = loaded.pipe.unet.state_dict()
    assert all(torch.equal(unet[key], state[key]) for key in state)
    frames = loaded.generate(Image.new("RGB", (64, 64), (90, 120, 30)),
                             {**lcm_request(loaded), "max_guidance_scale": 1.2}, lambda *_: None)
    assert frames.shape == (14, 64, 64, 3)


def lcm_request(generator) -> dict:
    from video_diffusion.params import resolve_defaults

    params = resolve_defaults({}, generator.model.defaults)
    return {**params, "seed": 1, "width": 64, "height": 64, "num_frames": 14}


def test_weights_that_do_not_fit_fail_the_load_with_a_clear_answer(tmp_path, monkeypatch, tiny_model_dir,
                                                                    generator):
    weights = tmp_path / "AnimateLCM-SVD-xt-1.1.safetensors"
    state = distilled_weights(generator, weights)
    save_file({key: value for key, value in list(state.items())[:-3]}, weights)  # keys missing: another model's file
    monkeypatch.setitem(pipeline.REPOS, "svd-xt", (str(tiny_model_dir), 25))
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, name: str(weights))
    app = create_app(settings_for(tmp_path, SVD_MODEL="animatelcm-svd-xt"), load=load_generator)
    try:
        health = wait_ready(app.test_client())
        assert health["status"] == "failed" and health["error"]["message"].startswith(
            "the model could not be loaded; the server log has the details")
        assert str(tmp_path) not in str(health)
    finally:
        app.extensions["video_diffusion"].backend.stop()


# --- scaled out: the API holds no model --------------------------------------------------------------------

@pytest.mark.slow
def test_through_redis_the_worker_samples_it_and_refuses_more_steps_than_it_has(tmp_path, lcm_dir, redis_server):
    """The API is not told the model (it may run on another machine): the worker's heartbeat gives the defaults,
    and the worker, not the API, refuses more steps than the sampler has levels. The worker is a fresh process:
    diffusers loads the scheduler module a folder names only if it is already imported (pytest's is)."""
    from test_async import ended, poll, submit

    (worker,) = start_worker_processes(tmp_path, lcm_dir, redis_server.url)
    app = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, WORKER_TTL="3"))
    client = app.test_client()
    try:
        params = {p["name"]: p for p in client.get("/params").json["params"]}
        assert params["num_inference_steps"]["effective_default"] == 4
        assert params["max_guidance_scale"]["effective_default"] == 1.2
        small = {"width": 64, "height": 64, "num_frames": 14}
        done = poll(client, submit(client, **small, seed=3).json["task_id"], ended)
        assert done["status"] == "finished", done
        assert (done["params"]["num_inference_steps"], done["params"]["max_guidance_scale"]) == (4, 1.2)
        assert done["model"].startswith("tiny-animatelcm")
        # The heartbeat carries the sampler's limit too: the API refuses at once (the worker's own check, for
        # requests an API let in before any worker was ready, is the next test).
        refused = submit(client, **small, num_inference_steps=41)
        assert refused.status_code == 422 and refused.json["error"]["field"] == "num_inference_steps"
        assert "1 to 40" in refused.json["error"]["message"]
    finally:
        app.extensions["video_diffusion"].backend.stop()
        worker.stop()


def test_a_task_asking_more_steps_than_the_sampler_has_fails_where_it_runs(lcm_generator, tmp_path):
    from video_diffusion.lifecycle.recipe import execute
    from video_diffusion.lifecycle.record import Task, TaskStatus, new_task_id

    task = Task(task_id=new_task_id(), mode="async", params={"seed": 1, "num_inference_steps": 41, "width": 64,
                                                              "height": 64})
    status, error = execute(lcm_generator, task, lambda: Image.new("RGB", (64, 64)), tmp_path / "video",
                            lambda *_: None)
    assert status is TaskStatus.FAILED and error == {
        "code": "invalid_parameter", "message": "`num_inference_steps` must be at most 40 with tiny-animatelcm, got 41"}


@pytest.mark.parametrize("env", [{"SVD_FORWARD_CHUNKING": "true"}, {"SVD_DTYPE": "bfloat16"}])
def test_the_memory_options_apply_to_it_as_to_any_model(lcm_dir, lcm_generator, env):
    loaded = load_generator(load_settings({"SVD_MODEL": str(lcm_dir), **env}, dotenv_path=None))
    assert isinstance(loaded.pipe.scheduler, AnimateLCMScheduler)
    image = Image.new("RGB", (64, 64), (90, 120, 30))
    frames = loaded.generate(image, lcm_request(loaded), lambda *_: None)
    reference = lcm_generator.generate(image, lcm_request(lcm_generator), lambda *_: None)
    assert frames.shape == reference.shape == (14, 64, 64, 3)
    # Chunking changes nothing but memory; bfloat16 rounds (mean 0.9 here), where another seed moves ~25.
    assert np.abs(frames.astype(int) - reference).mean() <= (0 if "SVD_FORWARD_CHUNKING" in env else 4)


def test_a_folder_saved_before_the_modules_moved_still_loads(lcm_dir, tmp_path):
    """Older releases saved the scheduler's module as `animatelcm`: such a folder loads with the same sampler."""
    old = tmp_path / "older-animatelcm"
    shutil.copytree(lcm_dir, old)
    index = json.loads((old / "model_index.json").read_text())
    assert index["scheduler"] == ["video_diffusion.models.animatelcm", "AnimateLCMScheduler"]
    index["scheduler"][0] = "animatelcm"
    (old / "model_index.json").write_text(json.dumps(index))
    generator = load_generator(load_settings({"SVD_MODEL": str(old)}, dotenv_path=None))
    assert type(generator.pipe.scheduler).__name__ == "AnimateLCMScheduler" and generator.model.max_steps == 40
