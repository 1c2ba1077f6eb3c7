"""POST /generate: videos decode to what was asked, with the headers clients rely on."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from conftest import SMALL, decode_video, image_bytes, upload


def top_level_boxes(data: bytes) -> list[str]:
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8:offset + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return boxes


@pytest.mark.parametrize("fmt,content_type", [("mp4", "video/mp4"), ("webm", "video/webm"), ("gif", "image/gif"),
                                              ("webp", "image/webp")])
def test_each_format_decodes_to_the_frames_size_and_fps_asked(client, fmt, content_type):
    response = client.post("/generate", data=upload(image_bytes(), **{**SMALL, "width": 96, "height": 64,
                                                                      "num_frames": 15, "fps": 8, "format": fmt}))
    assert response.status_code == 200, response.json
    assert response.headers["Content-Type"] == content_type
    assert int(response.headers["Content-Length"]) == len(response.data)
    assert response.headers["Content-Disposition"] == f"attachment; filename={response.headers['X-Task-Id']}.{fmt}"
    frames, fps = decode_video(response.data, fmt)
    assert frames.shape == (15, 64, 96, 3)
    assert fps == pytest.approx(8, rel=0.03)  # GIF stores delays in hundredths of a second


def test_mp4_is_h264_yuv420p_with_moov_before_mdat(client):
    response = client.post("/generate", data=upload(image_bytes(), **SMALL))
    boxes = top_level_boxes(response.data)
    assert boxes.index("moov") < boxes.index("mdat"), boxes
    with av.open(io.BytesIO(response.data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"


def test_headers_name_the_model_seed_task_and_timings(client):
    response = client.post("/generate", data=upload(image_bytes(), seed=1234, **SMALL))
    assert response.headers["X-Seed"] == "1234"
    assert "random weights" in response.headers["X-Model"]
    assert len(response.headers["X-Task-Id"]) == 32
    timing = response.headers["Server-Timing"]
    assert [part.split(";")[0] for part in timing.split(", ")] == ["queue", "generate", "postprocess", "encode"]
    assert float(timing.split("generate;dur=")[1].split(",")[0]) > 0


def test_same_seed_gives_identical_frames_and_a_random_seed_is_returned(client):
    def frames(**extra):
        response = client.post("/generate", data=upload(image_bytes(), format="webp", **SMALL, **extra))
        return decode_video(response.data, "webp")[0], response.headers["X-Seed"]

    first, seed = frames(seed=7)
    again, _ = frames(seed=7)
    other, _ = frames(seed=8)
    assert seed == "7"
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    _, drawn = frames()
    assert 0 <= int(drawn) <= 2**32 - 1


def test_the_video_is_kept_under_its_task_id(client, tmp_path):
    response = client.post("/generate", data=upload(image_bytes(), **SMALL))
    saved = tmp_path / "videos" / response.headers["X-Task-Id"] / "video.mp4"
    assert saved.read_bytes() == response.data


@pytest.mark.parametrize("sizing,image_size,expected", [
    ("crop", (300, 100), (64, 96)),  # exactly width x height
    ("fit", (300, 100), (64, 192)),  # 3:1 inside 192x96 is 192x64
    ("source", (130, 70), (64, 128)),  # own size rounded to 64
])
def test_sizing_modes(client, sizing, image_size, expected):
    params = dict(SMALL, sizing=sizing, format="webp")
    if sizing == "source":
        del params["width"], params["height"]
    else:
        params.update(width=96 if sizing == "crop" else 192, height=64 if sizing == "crop" else 96)
    response = client.post("/generate", data=upload(image_bytes(size=image_size), **params))
    assert response.status_code == 200, response.json
    frames, _ = decode_video(response.data, "webp")
    assert frames.shape[1:3] == expected


def test_image_in_field_file_as_raw_body_and_params_in_the_query(client):
    by_file = client.post("/generate", data=upload(image_bytes(), field="file", **SMALL))
    assert by_file.status_code == 200, by_file.json
    query = "&".join(f"{k}={v}" for k, v in {**SMALL, "seed": 3, "format": "gif"}.items())
    raw = client.post(f"/generate?{query}", data=image_bytes(fmt="JPEG"), content_type="image/jpeg")
    assert raw.status_code == 200, raw.json
    assert raw.headers["Content-Type"] == "image/gif"
    assert raw.headers["X-Seed"] == "3"


def test_default_request_uses_the_tiny_models_own_size(client):
    response = client.post("/generate", data=upload(image_bytes(), num_inference_steps=1, format="webp"))
    frames, fps = decode_video(response.data, "webp")
    assert frames.shape == (14, 144, 256, 3)
    assert fps == pytest.approx(6, rel=0.03)
