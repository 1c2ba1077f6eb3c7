"""Steps after the model: loops, output frame rate, chained segments, frames ZIP, JSON answers, the result cache.

The tiny model's output is noise, so what needs real motion (interpolation quality) or a drifting chain (colour
matching) gets it from synthetic frames; everything else runs the real pipeline through the service.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from video_diffusion.lifecycle import record as tasks
from conftest import SMALL, SteppedClock, decode_video, image_bytes, upload
from video_diffusion.params import resolve_defaults
from video_diffusion.media.postprocess import colour_stats, crossfade_length, make_loop, output_frames, retime

N = int(SMALL["num_frames"])


def unzip(data: bytes) -> np.ndarray:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert names == [f"frame_{i:04d}.png" for i in range(len(names))]
        return np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB")) for n in names])


def frames_of(client, **params) -> np.ndarray:
    response = client.post("/generate", data=upload(image_bytes(), **{**SMALL, "format": "frames", **params}))
    assert response.status_code == 200, response.json
    assert response.mimetype == "application/zip"
    return unzip(response.data)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def square(t: float, height: int = 64, width: int = 96) -> np.ndarray:
    """A frame of a square moving 4 px per source frame: the true picture at any instant `t`."""
    frame = np.full((height, width, 3), 30, np.uint8)
    x = int(round(10 + 4 * t))
    frame[20:40, x:x + 16] = (220, 180, 40)
    return frame


class Recording:
    """The real generator, with every call's conditioning image, seed and output kept for the test to check;
    `drift` brightens and reddens each output to stand in for a chain whose colours wander."""

    def __init__(self, generator, drift: float = 0.0, step_delay: dict[int, float] | None = None):
        self.inner, self.model, self.device, self.dtype = generator, generator.model, generator.device, "float32"
        self.needs_warm_up = False
        self.drift, self.step_delay = drift, step_delay or {}
        self.calls: list[dict] = []

    def generate(self, image, params, progress):
        call = {"image": np.asarray(image).copy(), "seed": params["seed"], "ended": False}
        self.calls.append(call)
        delay = self.step_delay.get(len(self.calls), 0.0)

        def slow(phase, step, total):
            progress(phase, step, total)
            time.sleep(delay)

        frames = self.inner.generate(image, params, slow)
        if self.drift:  # colour that follows the conditioning image, plus a shift: it compounds along a chain
            base = np.asarray(image, np.float32)[None] * 0.5 + frames.astype(np.float32) * 0.5
            frames = np.clip(base * (1 + self.drift) + [40 * self.drift, 0, 0], 0, 255).astype(np.uint8)
        call.update(frames=frames.copy(), ended=True)  # as made: the service matches colours in place
        return frames

    def warm_up(self):
        pass

    def describe(self):
        return self.inner.describe()

    def memory_stats(self):
        return {}


# --- loops --------------------------------------------------------------------------------------------

def test_pingpong_is_symmetric_and_starts_with_the_plain_clip(client):
    plain = frames_of(client, seed=11)
    looped = frames_of(client, seed=11, loop="pingpong")
    assert len(looped) == 2 * N - 2
    assert np.array_equal(looped[:N], plain)
    for i in range(1, 2 * N - 2):  # frame i equals frame 2N-2-i: played on repeat, it never jumps
        assert np.array_equal(looped[i], looped[2 * N - 2 - i]), i


def test_crossfade_keeps_the_count_and_dissolves_into_the_first_frame(client):
    plain = frames_of(client, seed=12)
    faded = frames_of(client, seed=12, loop="crossfade")
    k = crossfade_length(N)
    assert len(faded) == N and np.array_equal(faded[:N - k], plain[:N - k])
    assert not np.array_equal(faded[N - k:], plain[N - k:])
    # The seam (last frame back to the first) is smaller than it was, and than any step of the dissolve.
    seam = np.abs(faded[-1].astype(int) - faded[0]).mean()
    assert seam < np.abs(plain[-1].astype(int) - plain[0]).mean() / 2
    steps = [np.abs(faded[i + 1].astype(int) - faded[i]).mean() for i in range(N - k - 1, N - 1)]
    assert seam <= max(steps) + 1


# --- frame rate ---------------------------------------------------------------------------------------

def test_output_fps_above_fps_interpolates_and_keeps_the_duration(client):
    response = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=13, fps=6, output_fps=24))
    assert response.status_code == 200
    frames, rate = decode_video(response.data, "mp4")
    assert rate == 24 and len(frames) == N * 4  # 14 frames at 6 fps = 56 frames at 24 fps = 2.33 s
    assert client.get(f"/status/{response.headers['X-Task-Id']}").json["params"]["output_fps"] == 24


def test_output_fps_below_fps_drops_frames_evenly(client):
    plain = frames_of(client, seed=14, fps=12)
    slower = frames_of(client, seed=14, fps=12, output_fps=6)
    assert len(slower) == N // 2 and np.array_equal(slower, plain[::2])


def test_motion_interpolation_beats_duplication_by_10_db():
    source = np.stack([square(i) for i in range(N)])
    out = retime(source, 6, 24, looped=False)
    assert len(out) == 4 * N
    between = [j for j in range(len(out)) if j % 4 and j / 4 < N - 1]
    truth = np.stack([square(j / 4) for j in between])
    duplicated = np.stack([source[j // 4] for j in between])
    gain = psnr(out[between], truth) - psnr(duplicated, truth)
    assert gain >= 10, gain
    assert all(np.array_equal(out[4 * i], source[i]) for i in range(N))  # source instants are the sources


def test_a_loop_seam_is_interpolated_too():
    clip = make_loop(np.stack([square(i) for i in range(N)]), "pingpong")  # ... 2, 1, then back to 0
    out = retime(clip, 6, 24, looped=True)
    seam = out[-3:]  # after the last frame (position 1) and before the first (position 0): 0.75, 0.5, 0.25
    truth = np.stack([square(1 - k / 4) for k in (1, 2, 3)])
    held = np.stack([clip[-1]] * 3)  # what the clip without seam interpolation shows there
    assert np.abs(retime(clip, 6, 24, looped=False)[-3:].astype(int) - held).max() <= 2  # (YUV rounding)
    # The motion reverses at the seam, which costs the motion search a little: 9 dB here against 18 mid-clip.
    assert psnr(seam, truth) - psnr(held, truth) >= 6


# --- segments -----------------------------------------------------------------------------------------

def test_two_segments_chain_on_the_last_frame(make_app, generator):
    recording = Recording(generator)
    client = make_app(load=lambda settings: recording).test_client()
    frames = frames_of(client, seed=21, segments=2)
    assert len(frames) == 2 * N - 1
    first, second = recording.calls
    assert (first["seed"], second["seed"]) == (21, 22)
    assert np.array_equal(second["image"], first["frames"][-1])  # exactly the first segment's last frame
    assert np.array_equal(frames[:N], first["frames"])


def test_colour_matching_holds_a_drifting_chain(make_app, generator):
    recording = Recording(generator, drift=0.25)
    client = make_app(load=lambda settings: recording).test_client()
    frames = frames_of(client, seed=31, segments=3)
    segments = [frames[:N], frames[N:2 * N - 1], frames[2 * N - 1:]]
    reference = colour_stats(segments[0])[0]
    raw_drift = np.abs(colour_stats(recording.calls[2]["frames"])[0] - reference).max()
    assert raw_drift > 20  # the chain drifts without matching ...
    for segment in segments[1:]:  # ... and stays within a few levels of the first segment with it
        assert np.abs(colour_stats(segment)[0] - reference).max() < 4


def test_cancel_during_the_second_segment_stops_it(make_app, generator):
    recording = Recording(generator, step_delay={2: 0.3})
    client = make_app(load=lambda settings: recording).test_client()
    steps = 6
    response = client.post("/generate", data=upload(image_bytes(), **{**SMALL, "num_inference_steps": steps},
                                                    segments=2), headers={"Prefer": "respond-async"})
    task_id = response.json["task_id"]
    deadline = time.monotonic() + 30
    while client.get(f"/status/{task_id}").json["progress"]["step"] <= steps + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.delete(f"/tasks/{task_id}").status_code in (200, 202)
    while not (status := client.get(f"/status/{task_id}").json)["status"] in ("canceled", "finished", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["status"] == "canceled" and status["progress"]["total"] == 2 * steps
    assert len(recording.calls) == 2 and not recording.calls[1]["ended"]


# --- formats, limits and the interplay of options -----------------------------------------------------

@pytest.mark.parametrize("fmt", ["mp4", "webm", "gif", "webp", "frames"])
def test_every_format_takes_every_option(client, fmt):
    params = {**SMALL, "seed": 41, "segments": 2, "loop": "pingpong", "fps": 6, "output_fps": 12, "format": fmt}
    response = client.post("/generate", data=upload(image_bytes(), **params))
    assert response.status_code == 200, response.json
    expected = output_frames(N, 2, "pingpong", 6, 12)
    assert expected == 2 * (2 * (2 * N - 1) - 2)
    frames = unzip(response.data) if fmt == "frames" else decode_video(response.data, fmt)[0]
    assert len(frames) == expected and frames.shape[1:3] == (64, 64)


def test_sizing_holds_across_segments(client):
    response = client.post("/generate", data=upload(image_bytes(size=(200, 100)), format="frames", segments=2,
                                                    sizing="fit", width=128, height=128, num_inference_steps=1,
                                                    num_frames=14))
    assert response.status_code == 200
    assert unzip(response.data).shape == (2 * N - 1, 64, 128, 3)


@pytest.mark.parametrize("params, field", [
    ({"format": "gif", "output_fps": 60}, "output_fps"),
    ({"segments": 4, "loop": "pingpong", "output_fps": 60}, "output_fps"),
    ({"segments": 4, "num_frames": 30, "loop": "pingpong"}, "loop"),
    ({"segments": 5}, "segments"),
    ({"loop": "spiral"}, "loop"),
    ({"output_fps": 0}, "output_fps"),
])
def test_bad_combinations_are_422_naming_the_parameter(make_app, params, field):
    client = make_app(MAX_OUTPUT_FRAMES="200").test_client()
    response = client.post("/generate", data=upload(image_bytes(), fps=6, **params))
    assert response.status_code == 422 and response.json["error"]["field"] == field
    if "MAX_OUTPUT_FRAMES" in response.json["error"]["message"]:
        assert "`segments`" in response.json["error"]["message"]


def test_a_record_from_before_the_new_parameters_still_runs():
    old = {"fps": 6, "num_frames": None, "num_inference_steps": None, "width": None, "height": None, "seed": 1}
    resolved = resolve_defaults(old, {"num_frames": 14, "num_inference_steps": 2, "width": 64, "height": 64})
    assert (resolved["loop"], resolved["segments"], resolved["output_fps"]) == ("none", 1, 6)


# --- JSON answers -------------------------------------------------------------------------------------

def test_json_answers_hold_the_same_video(client):
    binary = client.post("/generate", data=upload(image_bytes(), **SMALL, format="frames"))
    task_id = binary.headers["X-Task-Id"]
    answer = client.get(f"/results/{task_id}", headers={"Accept": "application/json"})
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    assert answer.content_length == len(answer.data)
    body = answer.json
    assert set(body) == {"video", "content_type", "seed", "task_id", "model", "finish_reason", "timings"}
    assert body["finish_reason"] == "SUCCESS" and body["task_id"] == task_id
    assert body["content_type"] == "application/zip" and body["seed"] == int(binary.headers["X-Seed"])
    assert base64.b64decode(body["video"]) == binary.data
    assert np.array_equal(unzip(base64.b64decode(body["video"])), unzip(binary.data))
    # A browser's Accept (*/* and HTML) still gets the file; the video type preferred over JSON too.
    assert client.get(f"/results/{task_id}", headers={"Accept": "text/html,*/*;q=0.8"}).data == binary.data
    preferred = client.get(f"/results/{task_id}", headers={"Accept": "application/zip, application/json;q=0.5"})
    assert preferred.data == binary.data


def test_a_synchronous_generate_answers_json_when_asked(client):
    answer = client.post("/generate", data=upload(image_bytes(), **SMALL), headers={"Accept": "application/json"})
    assert answer.status_code == 200 and answer.json["content_type"] == "video/mp4"
    video = base64.b64decode(answer.json["video"])
    assert video == client.get(f"/results/{answer.json['task_id']}").data
    assert len(decode_video(video, "mp4")[0]) == N


# --- the result cache ---------------------------------------------------------------------------------

def test_a_repeat_naming_its_seed_is_answered_from_the_first_video(make_app, generator):
    recording = Recording(generator)
    client = make_app(load=lambda settings: recording).test_client()
    first = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=51))
    assert first.headers["X-Cache"] == "miss" and len(recording.calls) == 1
    repeat = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=51))
    assert repeat.status_code == 200 and repeat.headers["X-Cache"] == "hit"
    assert repeat.data == first.data and len(recording.calls) == 1  # nothing was generated
    assert repeat.headers["X-Task-Id"] != first.headers["X-Task-Id"]
    hit = client.get(f"/status/{repeat.headers['X-Task-Id']}").json
    assert hit["status"] == "finished" and hit["timings"]["generation"] == 0
    # Another seed, another image, or no seed at all: generated.
    for changed in ({"seed": 52}, {"seed": 51, "image": image_bytes(color=(10, 200, 10))}):
        data = changed.pop("image", image_bytes())
        assert client.post("/generate", data=upload(data, **SMALL, **changed)).headers["X-Cache"] == "miss"
    for _ in range(2):
        assert client.post("/generate", data=upload(image_bytes(), **SMALL)).headers["X-Cache"] == "miss"
    assert len(recording.calls) == 5
    metrics = client.get("/metrics").text
    assert 'video_diffusion_result_cache_total{outcome="hit"} 1.0' in metrics


def test_result_cache_false_always_generates(make_app, generator):
    recording = Recording(generator)
    client = make_app(load=lambda settings: recording, RESULT_CACHE="false").test_client()
    for _ in range(2):
        assert client.post("/generate", data=upload(image_bytes(), **SMALL, seed=53)).headers["X-Cache"] == "miss"
    assert len(recording.calls) == 2


def test_a_hit_never_outlives_the_video_it_points_at(make_app, generator):
    clock = SteppedClock()
    recording = Recording(generator)
    client = make_app(load=lambda settings: recording, RESULT_TTL="60", clock=clock).test_client()
    first = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=54))
    hit = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=54))
    assert hit.headers["X-Cache"] == "hit"
    hit_id, first_id = hit.headers["X-Task-Id"], first.headers["X-Task-Id"]
    assert client.get(f"/status/{hit_id}").json["result_url"]
    clock.advance(60.2)  # the first video's RESULT_TTL has passed: the hit goes with it
    for task_id in (first_id, hit_id):
        assert client.get(f"/results/{task_id}").status_code == 410
        assert client.get(f"/status/{task_id}").json["result_url"] is None
    again = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=54))
    assert again.headers["X-Cache"] == "miss" and again.data == first.data and len(recording.calls) == 2
    # Within CACHE_MIN_LIFE of the end, the video is not handed out again either.
    clock.advance(60 - tasks.CACHE_MIN_LIFE + 0.1)
    late = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=54))
    assert late.headers["X-Cache"] == "miss"


def test_the_cache_survives_a_restart(make_app, generator, tmp_path):
    first_app = make_app()
    first = first_app.test_client().post("/generate", data=upload(image_bytes(), **SMALL, seed=55))
    first_app.extensions["video_diffusion"].backend.stop()
    from conftest import settings_for, wait_ready
    from server import create_app

    recording = Recording(generator)
    again = create_app(settings_for(tmp_path), load=lambda settings: recording)  # the same folder
    try:
        client = again.test_client()
        wait_ready(client)
        repeat = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=55))
        assert repeat.headers["X-Cache"] == "hit" and repeat.data == first.data and not recording.calls
    finally:
        again.extensions["video_diffusion"].backend.stop()


def test_a_cache_hit_for_an_async_client(client):
    first = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=56))
    hit = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=56), headers={"Prefer": "respond-async"})
    assert hit.status_code == 202 and hit.headers["X-Cache"] == "hit" and hit.json["status"] == "finished"
    assert client.get(hit.json["result_url"]).data == first.data
    assert client.delete(f"/tasks/{hit.json['task_id']}").status_code == 409


def test_threads_do_not_share_a_segment_chain(client):
    """Two chained requests at once: each video is what it would be alone (the pipeline lock orders them)."""
    alone = {seed: frames_of(client, seed=seed, segments=2) for seed in (61, 62)}
    results = {}

    def run(seed):
        results[seed] = client.post("/generate", data=upload(image_bytes(), **SMALL, format="frames", segments=2,
                                                             seed=seed, loop="crossfade"))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (61, 62)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for seed in (61, 62):
        together = unzip(results[seed].data)
        k = crossfade_length(len(together))
        assert np.array_equal(together[:len(together) - k], alone[seed][:len(together) - k])


# --- bounded memory: clips without copies, interpolation in chunks ----------------------------------------------

@pytest.mark.parametrize("fps,output_fps,looped", [(6, 24, False), (6, 15, False), (8, 12, True)])
def test_interpolation_in_chunks_side_by_side_equals_one_pass(fps, output_fps, looped):
    """Chunks start on shared instants and read 3 frames past their ends: the joined clip keeps the one pass's
    frame count and source frames, within 0.5 dB of its in-betweens (here: the same frames)."""
    from video_diffusion.media.postprocess import Clip, interpolation_chunks, motion_interpolate, retimed

    source = np.stack([square(i / 3) for i in range(48)])
    runs = {}
    for cores in (1, 4):
        def chunked(clip, f, o, loop, cores=cores):
            return motion_interpolate(clip, f, o, loop, cores=cores)

        runs[cores] = retimed(Clip(source), fps, output_fps, looped, interpolate=chunked).array()
    bounds = interpolation_chunks(48, fps, output_fps, 4, source.nbytes, len(runs[1]) * source[0].nbytes)
    assert len(bounds) >= 4  # really in chunks
    one, joined = runs[1], runs[4]
    assert len(joined) == len(one) == round(48 * output_fps / fps)
    assert all(np.array_equal(joined[j], source[j * fps // output_fps])
               for j in range(len(joined)) if (j * fps) % output_fps == 0)
    between = [j for j in range(len(one)) if (j * fps) % output_fps and j * fps / output_fps < 47]
    truth = np.stack([square(j * fps / output_fps / 3) for j in between])
    assert psnr(joined[between], truth) >= psnr(one[between], truth) - 0.5


def test_chunks_wait_in_memory_only_within_the_share_of_the_output():
    from video_diffusion.media.postprocess import MEMORY_SHARE, interpolation_chunks

    frame = 64 * 64 * 3
    # x4 interpolation: the source is a quarter of the output, so all cores may work (their outputs wait).
    assert len(interpolation_chunks(96, 6, 24, 8, 96 * frame, 384 * frame)) - 1 == 8
    # 20 -> 21 fps: the source is most of the output; a second chunk's waiting half would pass the share.
    assert len(interpolation_chunks(96, 20, 21, 8, 96 * frame, 101 * frame)) - 1 == 1
    for cores in range(1, 9):
        bounds = interpolation_chunks(96, 6, 8, cores, 96 * frame, 128 * frame)
        chunks = len(bounds) - 1
        assert 96 * frame + 128 * frame * (chunks - 1) / chunks <= MEMORY_SHARE * 128 * frame


def test_a_ping_pong_holds_no_copy_and_colour_matching_works_in_place():
    from video_diffusion.media.postprocess import Clip, looped, match_colours

    frames = np.stack([square(i) for i in range(N)])
    clip = looped(Clip(frames), "pingpong")
    assert len(clip) == 2 * N - 2 and clip.held_bytes() == frames.nbytes
    assert np.array_equal(clip.array(), make_loop(frames, "pingpong"))
    faded = looped(Clip(frames), "crossfade")
    assert faded.held_bytes() == frames.nbytes + crossfade_length(N) * frames[0].nbytes
    drifted = np.clip(frames.astype(int) + 30, 0, 255).astype(np.uint8)
    matched = match_colours(drifted, colour_stats(frames))
    assert matched is drifted and np.abs(colour_stats(matched)[0] - colour_stats(frames)[0]).max() < 2


def test_a_change_of_the_servers_defaults_is_a_cache_miss(make_app, tiny_model_dir, tmp_path):
    """Before: restarted with VIDEO_WIDTH/HEIGHT/FRAMES, a seeded request leaving the size to the server got the
    old video (X-Cache: hit). The key holds every value the server decided."""
    from pipeline import load_generator

    folder = {"VIDEO_OUTPUT_PATH": str(tmp_path / "shared"), "SVD_MODEL": str(tiny_model_dir)}
    request = {"seed": "57", "num_inference_steps": "1"}
    first_app = make_app(load=load_generator, **folder)
    first = first_app.test_client().post("/generate", data=upload(image_bytes(), **request))
    assert first.headers["X-Cache"] == "miss" and decode_video(first.data, "mp4")[0].shape == (14, 144, 256, 3)
    first_app.extensions["video_diffusion"].backend.stop()
    resized = make_app(load=load_generator, VIDEO_WIDTH="128", VIDEO_HEIGHT="64", VIDEO_FRAMES="20", **folder)
    again = resized.test_client().post("/generate", data=upload(image_bytes(), **request))
    assert again.headers["X-Cache"] == "miss" and decode_video(again.data, "mp4")[0].shape == (20, 64, 128, 3)
    repeat = resized.test_client().post("/generate", data=upload(image_bytes(), **request))
    assert repeat.headers["X-Cache"] == "hit" and repeat.data == again.data
