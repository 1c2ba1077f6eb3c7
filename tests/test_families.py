"""Wan and LTX-Video behind the same API as SVD: folders saved by diffusers' own classes, per-model parameters and
rules, prompts, both backends. The folders here are built from the diffusers and transformers classes directly
(not with the project's helpers), with their own small configs, as someone else's conversion would be."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from config import load_settings
from conftest import (ROOT, decode_video, image_bytes, ready_gunicorn, settings_for, start_worker_processes, upload,
                      wait_ready)
from pipeline import describe_model, load_generator, save_tiny_pipeline
from server import create_app
from test_async import ended, poll

TINY = {"width": "64", "height": "64", "num_frames": "9", "num_inference_steps": "2"}


def _text_parts(encoder_class, config_class):
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer()
    encoder = encoder_class(config_class(vocab_size=len(tokenizer), d_model=16, d_ff=24, d_kv=4, num_heads=4,
                                         num_layers=1, relative_attention_num_buckets=8)).eval()
    return tokenizer, encoder


def save_wan_ti2v(path) -> None:
    """Wan 2.2 TI2V-5B's layout: no image encoder, expand_timesteps, a x16 VAE with 2x2 patches."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(3)
    tokenizer, text_encoder = _text_parts(UMT5EncoderModel, UMT5Config)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=48, out_channels=48, text_dim=16, freq_dim=256, ffn_dim=16,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, dim_mult=[1, 1, 1, 1],
                           num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                           scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                           latents_std=[1.0] * 48).eval()
    WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                              flow_shift=3.0),
                            image_encoder=None, image_processor=None, expand_timesteps=True).save_pretrained(path)


def save_wan_21(path) -> None:
    """Wan 2.1 I2V's layout: a CLIP image encoder beside the text encoder, a x8 VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from diffusers import WanTransformer3DModel
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config,
                              UMT5EncoderModel)

    torch.manual_seed(4)
    tokenizer, text_encoder = _text_parts(UMT5EncoderModel, UMT5Config)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        intermediate_size=8, patch_size=1)).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=36, out_channels=16, text_dim=16, freq_dim=256, ffn_dim=16,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32, image_dim=4).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_encoder=image_encoder,
                            image_processor=CLIPImageProcessor(crop_size=32, size=32)).save_pretrained(path)


def save_ltx(path, text_to_video: bool = True) -> None:
    """LTX-Video as Lightricks/LTX-Video is published: its model_index names the text-to-video LTXPipeline."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline,
                           LTXPipeline, LTXVideoTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(5)
    tokenizer, text_encoder = _text_parts(T5EncoderModel, T5Config)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=1, caption_channels=16).eval()
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    cls = LTXPipeline if text_to_video else LTXImageToVideoPipeline
    cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer).save_pretrained(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, save in (("wan-ti2v", save_wan_ti2v), ("wan-21", save_wan_21), ("ltx", save_ltx)):
        made[name] = tmp_path_factory.mktemp(name)
        save(made[name])
    return made


@pytest.fixture(scope="module")
def generators(folders):
    return {name: load_generator(load_settings({"MODEL": str(path)}, dotenv_path=None))
            for name, path in folders.items()}


@pytest.fixture
def serve(tmp_path, generators):
    """serve(name, **env) -> a ready test client of an app serving that folder's generator."""
    apps = []

    def make(name, **env):
        generator = generators[name]
        app = create_app(settings_for(tmp_path / f"app{len(apps)}", MODEL=str(generator.model.source), **env),
                         load=lambda _settings: generator)
        apps.append(app)
        wait_ready(app.test_client())
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["video_diffusion"].backend.stop()


def frames_of(response) -> np.ndarray:
    assert response.status_code == 200, response.get_data(as_text=True)
    return decode_video(response.data, "mp4")[0]


@pytest.mark.parametrize("name,family,multiple,step", [("wan-ti2v", "wan", 32, 4), ("wan-21", "wan", 16, 4),
                                                       ("ltx", "ltx", 32, 4)])
def test_a_folder_is_recognised_by_the_pipeline_its_model_index_names(folders, generators, name, family, multiple,
                                                                      step):
    model = describe_model(load_settings({"SVD_MODEL": str(folders[name])}, dotenv_path=None), gpu=False)
    assert (model.family, model.size_multiple, model.frames[2], model.noise) == (family, multiple, step, False)
    assert model.name == folders[name].name  # named by its base name, never its path
    expected = {"wan": "WanImageToVideoPipeline", "ltx": "LTXImageToVideoPipeline"}[family]
    assert type(generators[name].pipe).__name__ == expected  # LTX's text-to-video folder serves image-to-video


@pytest.mark.parametrize("name", ["wan-ti2v", "wan-21", "ltx"])
def test_each_folder_serves_a_video_sync_and_async(serve, name):
    client = serve(name)
    sync = client.post("/generate", data=upload(image_bytes((80, 64)), prompt="a red square drifts", seed=1, **TINY))
    frames = frames_of(sync)
    assert frames.shape == (9, 64, 64, 3) and sync.headers["X-Model"] == generators_name(client)
    task = client.post("/generate", data=upload(image_bytes(), seed=2, **TINY),
                       headers={"Prefer": "respond-async"}).json["task_id"]
    status = poll(client, task, ended, timeout=120)
    assert status["status"] == "finished" and status["params"]["prompt"] == ""
    assert frames_of(client.get(f"/results/{task}")).shape == (9, 64, 64, 3)


def generators_name(client) -> str:
    return client.get("/health").json["model"]


def test_the_same_seed_and_prompt_give_the_same_frames_and_a_new_prompt_is_a_miss(serve):
    client = serve("wan-ti2v", RESULT_CACHE="false")
    one = frames_of(client.post("/generate", data=upload(image_bytes(), prompt="waves", seed=7, **TINY)))
    two = frames_of(client.post("/generate", data=upload(image_bytes(), prompt="waves", seed=7, **TINY)))
    assert np.array_equal(one, two)
    cached = serve("wan-ti2v")
    first = cached.post("/generate", data=upload(image_bytes(), prompt="waves", seed=7, **TINY))
    # The offline tokenizer's vocabulary has no words (each one is <unk>): prompts differ to it by their length.
    other = cached.post("/generate", data=upload(image_bytes(), prompt="waves on rocks", seed=7, **TINY))
    again = cached.post("/generate", data=upload(image_bytes(), prompt="waves on rocks", seed=7, **TINY))
    assert (first.headers["X-Cache"], other.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "miss", "hit")
    assert not np.array_equal(frames_of(first), frames_of(other))


@pytest.mark.parametrize("extra,field,needle", [
    ({"motion_bucket_id": "100"}, "motion_bucket_id", "SVD models"),
    ({"noise_aug_strength": "0.1"}, "noise_aug_strength", "SVD models"),
    ({"num_frames": "10"}, "num_frames", "4k+1"),
    ({"width": "80", "height": "64"}, "width", "a multiple of 32"),
    ({"guidance_scale": "0.5"}, "guidance_scale", "1 to 20"),
    ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
])
def test_a_wan_server_refuses_what_its_model_does_not_take_naming_the_field(serve, extra, field, needle):
    client = serve("wan-ti2v")
    response = client.post("/generate", data=upload(image_bytes(), **{**TINY, **extra}))
    assert response.status_code == 422 and response.json["error"]["field"] == field
    assert needle in response.json["error"]["message"]


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "guidance_scale"])
def test_an_svd_server_refuses_prompt_parameters_naming_the_models_that_take_them(client, field):
    response = client.post("/generate", data=upload(image_bytes(), **{field: "2"}))
    assert response.status_code == 422 and response.json["error"]["field"] == field
    assert "Wan and LTX-Video models" in response.json["error"]["message"]


def test_ltx_frames_follow_its_vae_and_params_show_the_prompt(serve):
    client = serve("ltx")
    described = client.get("/params").json
    names = [p["name"] for p in described["params"]]
    assert described["family"] == "ltx" and "prompt" in names and "motion_bucket_id" not in names
    frames = next(p for p in described["params"] if p["name"] == "num_frames")
    assert (frames["minimum"], frames["step"], frames["effective_default"]) == (5, 4, 161)
    assert client.post("/generate", data=upload(image_bytes(), **{**TINY, "num_frames": "8"})).status_code == 422
    spec = client.get("/openapi.json").json["paths"]["/generate"]["post"]["requestBody"]["content"]
    assert "prompt" in json.dumps(spec) and "motion_bucket_id" not in json.dumps(spec)


def test_segments_carry_the_prompt_and_chain_on_the_last_frame(serve):
    client = serve("wan-21")
    response = client.post("/generate", data=upload(image_bytes(), prompt="a slow pan", seed=3, segments="2", **TINY))
    assert frames_of(response).shape[0] == 9 + 8
    task = client.get(f"/status/{response.headers['X-Task-Id']}").json
    assert task["params"]["prompt"] == "a slow pan" and task["params"]["segments"] == 2


def test_a_video_setting_that_does_not_fit_the_model_fails_the_load_naming_it(tmp_path):
    app = create_app(settings_for(tmp_path, MODEL="tiny-wan", VIDEO_FRAMES="10"))
    try:
        health = wait_ready(app.test_client(), timeout=60)
        assert health["status"] == "failed" and "VIDEO_FRAMES=10" in health["error"]["message"]
        assert "4k+1" in health["error"]["message"]
    finally:
        app.extensions["video_diffusion"].backend.stop()


@pytest.mark.parametrize("name,frames", [("tiny-wan", 9), ("tiny-ltx", 9)])
def test_the_tiny_families_make_a_64x64_video_in_seconds(tmp_path, name, frames):
    app = create_app(settings_for(tmp_path, MODEL=name))
    try:
        assert wait_ready(app.test_client(), timeout=120)["model"] == f"{name} (random weights: the output is noise)"
        response = app.test_client().post("/generate", data=upload(image_bytes(), seed=1))
        assert frames_of(response).shape == (frames, 64, 64, 3)
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_a_saved_tiny_wan_folder_is_noise_and_reloads_bit_identical(tmp_path):
    save_tiny_pipeline(tmp_path / "tiny-wan", family="wan")
    model = describe_model(load_settings({"MODEL": str(tmp_path / "tiny-wan")}, dotenv_path=None), gpu=False)
    assert (model.family, model.noise, model.defaults["num_frames"]) == ("wan", True, 9)


@pytest.mark.slow
def test_make_runs_command_serves_a_wan_folder(tmp_path, folders):
    with ready_gunicorn(tmp_path, {"MODEL": str(folders["wan-ti2v"])}) as server:
        response = requests.post(server.url + "/generate", files={"image": ("in.png", image_bytes())},
                                 data={"prompt": "a boat", **TINY}, timeout=120)
        assert response.status_code == 200 and response.headers["X-Model"] == folders["wan-ti2v"].name
        assert decode_video(response.content, "mp4")[0].shape == (9, 64, 64, 3)


@pytest.mark.slow
def test_redis_api_learns_the_ltx_schema_from_its_worker(tmp_path, folders, redis_server):
    workers = start_worker_processes(tmp_path, folders["ltx"], redis_server.url)
    app = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, WORKER_TTL="3"))  # the API names no model
    client = app.test_client()
    try:
        assert [p["name"] for p in client.get("/params").json["params"]].count("prompt") == 1
        refused = client.post("/generate", data=upload(image_bytes(), motion_bucket_id="9", **TINY))
        assert refused.status_code == 422 and "SVD models" in refused.json["error"]["message"]
        done = client.post("/generate", data=upload(image_bytes(), prompt="rain", seed=4, **TINY))
        assert frames_of(done).shape == (9, 64, 64, 3)
    finally:
        app.extensions["video_diffusion"].backend.stop()
        for worker in workers:
            worker.stop()


# --- cache=fast: diffusers' First Block Cache, on for one call at a time ---------------------------------------

@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan")
    save_tiny_pipeline(path, family="wan")
    return path


def _wan(folder):
    return load_generator(load_settings({"MODEL": str(folder)}, dotenv_path=None))


def _tail_block_work(generator) -> list[int]:
    """A counter of the work done by every transformer block but the first (its first linear layer's calls)."""
    calls = [0]
    for block in generator.pipe.transformer.blocks[1:]:
        linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _run(generator, seed: int, cache: str, colour=(200, 40, 40)) -> np.ndarray:
    from video_diffusion.params import resolve_defaults

    params = resolve_defaults({"seed": seed, "cache": cache, "num_inference_steps": 8, "prompt": "a b"},
                              generator.model.defaults, "wan")
    return generator.generate(Image.new("RGB", (64, 64), colour), params, lambda *_: None)


def test_cache_fast_skips_transformer_work_and_off_is_exact_again(tiny_wan_dir):
    generator = _wan(tiny_wan_dir)
    work = _tail_block_work(generator)
    plain = _run(generator, 1, "off")
    full = work[0]
    fast = _run(generator, 1, "fast")
    skipped = work[0] - full
    assert skipped < full / 2  # the tiny model: 16 tail-block passes in full (8 steps x 2 for guidance), 4 cached
    assert 0 < np.abs(fast.astype(int) - plain).mean() < 8  # close to the full computation, not the same
    assert np.array_equal(_run(generator, 1, "off"), plain)  # off after fast: bit-identical to before


def test_cache_state_never_crosses_calls(tiny_wan_dir):
    used, fresh = _wan(tiny_wan_dir), _wan(tiny_wan_dir)
    _run(used, 3, "fast", colour=(20, 200, 90))  # another image and seed first
    assert np.array_equal(_run(used, 4, "fast"), _run(fresh, 4, "fast"))


def test_cache_is_a_wan_and_ltx_parameter(serve, client):
    assert client.post("/generate", data=upload(image_bytes(), cache="fast")).json["error"]["field"] == "cache"
    response = serve("ltx").post("/generate", data=upload(image_bytes(), cache="fast", seed=2, **TINY))
    assert frames_of(response).shape == (9, 64, 64, 3)  # a one-block transformer: computed in full, said in the log


def test_compile_warms_up_a_wan_model_before_health_says_ok(tmp_path, tiny_wan_dir, monkeypatch, caplog):
    import pipeline

    monkeypatch.setattr(pipeline, "COMPILE_BACKEND", "eager")  # dynamo's tracing without inductor's code generation
    app = create_app(settings_for(tmp_path, MODEL=str(tiny_wan_dir), SVD_COMPILE="true"))
    try:
        client = app.test_client()
        assert wait_ready(client, timeout=300)["status"] == "ok" and "warm-up done" in caplog.text
        plain = _run(_wan(tiny_wan_dir), 6, "off")
        compiled = app.extensions["video_diffusion"].backend.generator
        assert np.abs(_run(compiled, 6, "off").astype(int) - plain).max() <= 1  # the same network, compiled
    finally:
        app.extensions["video_diffusion"].backend.stop()


def test_vae_tiling_applies_to_wan(tmp_path, tiny_wan_dir):
    tiled = load_generator(load_settings({"MODEL": str(tiny_wan_dir), "VAE_TILING": "true"}, dotenv_path=None))
    assert tiled.pipe.vae.use_tiling
    assert _run(tiled, 2, "off").shape == (9, 64, 64, 3)


@pytest.mark.parametrize("fmt", ["webm", "gif", "webp", "frames"])
def test_every_format_loops_and_retiming_work_the_same_for_wan(serve, fmt):
    import zipfile

    from video_diffusion.media.postprocess import output_frames

    client = serve("wan-ti2v")
    response = client.post("/generate", data=upload(image_bytes(), prompt="surf", seed=8, format=fmt,
                                                    loop="pingpong", output_fps="30", **TINY))
    assert response.status_code == 200, response.get_data(as_text=True)
    expected = output_frames(9, 1, "pingpong", 24, 30)  # Wan 2.2's 24 fps by default
    if fmt == "frames":
        assert len(zipfile.ZipFile(io.BytesIO(response.data)).namelist()) == expected
    else:
        frames, fps = decode_video(response.data, fmt)
        assert frames.shape[1:] == (64, 64, 3) and len(frames) == expected and round(fps) == 30


def test_an_idempotency_key_replays_the_same_wan_task(serve):
    client = serve("ltx")
    data = {"prompt": "fog", "seed": "9", **TINY}
    first = client.post("/generate", data=upload(image_bytes(), **data), headers={"Idempotency-Key": "ltx-1"})
    again = client.post("/generate", data=upload(image_bytes(), **data), headers={"Idempotency-Key": "ltx-1"})
    assert first.status_code == again.status_code == 200
    assert again.headers["X-Task-Id"] == first.headers["X-Task-Id"] and again.data == first.data
    other = client.post("/generate", data=upload(image_bytes(), **{**data, "prompt": "smoke"}),
                        headers={"Idempotency-Key": "ltx-1"})
    assert other.status_code == 422 and other.json["error"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize("name,billions", [("wan2.2-ti2v-5b", 5.0), ("ltx-video", 1.9), ("svd-xt", 1.5),
                                           ("wan2.1-i2v-14b-720p", 14.0)])
def test_full_size_architectures_have_the_published_sizes(name, billions, monkeypatch):
    """bench/gpu_stages.py --random-weights builds these on a GPU: shapes only here (the meta device holds no
    memory), checked against the size each model card publishes, in the class the service serves."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import architectures
    from diffusers import StableVideoDiffusionPipeline

    from video_diffusion.models.families import family_named

    pipe = architectures.build(name, device="meta")
    family = family_named(name)
    assert type(pipe).__name__ == family.PIPELINE or isinstance(pipe, StableVideoDiffusionPipeline)
    denoiser = family.denoiser(pipe)
    if name.startswith("wan2.1"):  # the card's 14B is the network without the I2V image branch (16.4B with it)
        import diffusers

        _, config = architectures.TRANSFORMERS[name]
        with torch.device("meta"):
            denoiser = diffusers.WanTransformer3DModel(**{**config, "image_dim": None, "added_kv_proj_dim": None,
                                                         "in_channels": 16})
        assert architectures.parameters(family.denoiser(pipe)) / 1e9 == pytest.approx(16.4, abs=0.1)
    assert architectures.parameters(denoiser) / 1e9 == pytest.approx(billions, rel=0.03)
    assert pipe.vae.dtype == torch.float32
    if family.FAMILY != "svd":  # the XXL text encoders: T5 v1.1 (4.76B) for LTX-Video, UMT5 (5.68B) for Wan
        assert architectures.parameters(pipe.text_encoder) / 1e9 == pytest.approx(
            5.68 if family.FAMILY == "wan" else 4.76, abs=0.01)


@pytest.mark.slow
def test_a_redis_api_validates_against_what_model_names_before_any_worker_and_never_guesses(tmp_path, redis_server):
    """No worker yet: a named model's schema is known to the API; a folder only the workers can read is not, so the
    API answers 503 until a worker reports it (it validated against SVD-XT's schema before)."""
    named = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, MODEL="tiny-wan"))
    unseen = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, MODEL=str(tmp_path / "on-the-workers")))
    try:
        client = named.test_client()
        refused = client.post("/generate", data=upload(image_bytes(), motion_bucket_id="9", **TINY),
                              headers={"Prefer": "respond-async"})
        assert refused.status_code == 422 and refused.json["error"]["field"] == "motion_bucket_id"
        queued = client.post("/generate", data=upload(image_bytes(), prompt="rain", **TINY),
                             headers={"Prefer": "respond-async"})
        assert queued.status_code == 202, queued.json
        client = unseen.test_client()
        for answer in (client.get("/params"), client.post("/generate", data=upload(image_bytes(), prompt="rain"),
                                                          headers={"Prefer": "respond-async"})):
            assert answer.status_code == 503 and answer.json["error"]["code"] == "model_not_ready"
            assert "no worker has reported" in answer.json["error"]["message"] and str(tmp_path) not in answer.text
            assert answer.headers["Retry-After"] == "10"
    finally:
        for app in (named, unseen):
            app.extensions["video_diffusion"].backend.stop()


@pytest.mark.slow
def test_a_redis_submission_reads_the_heartbeats_once(tmp_path, redis_server):
    app = create_app(settings_for(tmp_path, REDIS_URL=redis_server.url, MODEL="tiny-ltx"))
    backend = app.extensions["video_diffusion"].backend
    reads = []
    real = backend.store.workers
    backend.store.workers = lambda: reads.append(1) or real()
    try:
        time.sleep(1.1)  # past what any earlier read remembered
        answer = app.test_client().post("/generate", data=upload(image_bytes(), prompt="rain", **TINY),
                                        headers={"Prefer": "respond-async"})
        assert answer.status_code == 202 and len(reads) == 1
    finally:
        backend.stop()
