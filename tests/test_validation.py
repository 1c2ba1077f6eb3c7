"""Bad input gets a JSON 4xx that names what is wrong; odd but valid images are converted correctly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL, image_bytes, upload
from video_diffusion.media.images import load_image
from video_diffusion.params import PARAMS

NUMERIC = [p for p in PARAMS if p.type is not str and p.taken_by("svd")]  # what the tiny SVD server takes


def bad_values(param):
    below = param.minimum - (1 if param.type is int else 0.5)
    above = param.maximum + (param.multiple_of or 1)
    return [("below", below), ("above", above), ("wrong type", "lots")]


@pytest.mark.parametrize("param,case,value", [(p, case, v) for p in NUMERIC for case, v in bad_values(p)],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_every_parameter_out_of_range_or_of_the_wrong_type_is_a_422_naming_it(client, param, case, value):
    response = client.post("/generate", data=upload(image_bytes(), **{**SMALL, param.name: value}))
    assert response.status_code == 422
    error = response.json["error"]
    assert error["code"] == "invalid_parameter"
    assert error["field"] == param.name
    assert param.name in error["message"] and str(value) in error["message"]


@pytest.mark.parametrize("name", ["format", "sizing"])
def test_unknown_choice_lists_the_allowed_ones(client, name):
    response = client.post("/generate", data=upload(image_bytes(), **{name: "avi"}))
    assert response.status_code == 422
    assert response.json["error"]["field"] == name
    assert "avi" in response.json["error"]["message"] and "one of" in response.json["error"]["message"]


@pytest.mark.parametrize("extra,field", [
    ({"colour": "red"}, "colour"),
    ({"width": "100", "height": "64"}, "width"),  # not a multiple of 8
    ({"width": "128"}, "height"),  # width without height
    ({"min_guidance_scale": "5", "max_guidance_scale": "2"}, "min_guidance_scale"),
    ({"min_guidance_scale": "0.5", "max_guidance_scale": "0"}, "min_guidance_scale"),  # 0 is given, not missing
    ({"min_guidance_scale": "3.5"}, "min_guidance_scale"),  # above the model's default maximum, 3.0
    ({"sizing": "source", "width": "128", "height": "128"}, "width"),
    ({"noise_aug_strength": "nan"}, "noise_aug_strength"),
])
def test_other_parameter_errors_name_the_field(client, extra, field):
    response = client.post("/generate", data=upload(image_bytes(), **extra))
    assert response.status_code == 422, response.json
    assert response.json["error"]["field"] == field


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def test_the_bomb_png_is_a_few_kb():
    assert len(png_declaring(20000, 20000)) < 10_000


def tiff_bytes() -> bytes:
    return image_bytes(fmt="TIFF")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


@pytest.mark.parametrize("data,status,code", [
    (b"", 400, "missing_image"),
    (image_bytes(size=(200, 200))[:300], 400, "invalid_image"),  # truncated PNG
    (b"just some text, not an image\n", 415, "unsupported_media_type"),
    (tiff_bytes(), 415, "unsupported_media_type"),
    (EPS, 415, "unsupported_media_type"),
    (SVG, 415, "unsupported_media_type"),
    (png_declaring(20000, 20000), 413, "image_too_large"),
], ids=["empty", "truncated-png", "text", "tiff-as-png", "eps-as-png", "svg-as-png", "20000x20000-png"])
def test_bad_images(client, data, status, code):
    response = client.post("/generate", data=upload(data, name="input.png", **SMALL))
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code
    assert response.json["error"]["field"] == "image"


def test_missing_image_and_wrong_content_type(client):
    assert client.post("/generate", data=SMALL).json["error"]["code"] == "missing_image"
    assert client.post("/generate", data={"image": "not a file"}).json["error"]["field"] == "image"
    response = client.post("/generate", data=b"{}", content_type="application/json")
    assert response.status_code == 415 and "multipart/form-data" in response.json["error"]["message"]


def test_body_over_max_upload_is_413(make_app):
    client = make_app(MAX_UPLOAD_MB="1").test_client()
    response = client.post("/generate", data=upload(b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024)))
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    assert "MAX_UPLOAD_MB=1" in response.json["error"]["message"]


def test_a_webp_over_its_share_of_max_image_pixels_is_refused_from_its_header(make_app):
    client = make_app(MAX_IMAGE_PIXELS="8000000").test_client()  # WebP: 2,000,000 pixels
    buffer = io.BytesIO()
    Image.new("RGB", (2100, 1000), (9, 9, 9)).save(buffer, format="WEBP", quality=10)
    response = client.post("/generate", data=upload(buffer.getvalue(), **SMALL))
    assert response.status_code == 413 and "WebP" in response.json["error"]["message"]
    buffer = io.BytesIO()
    Image.new("RGB", (1900, 1000), (9, 9, 9)).save(buffer, format="WEBP", quality=10)
    assert client.post("/generate", data=upload(buffer.getvalue(), **SMALL)).status_code == 200


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").json["error"]["code"] == "not_found"
    wrong = client.get("/generate")
    assert wrong.status_code == 405 and wrong.json["error"]["code"] == "method_not_allowed"
    assert wrong.json["error"]["message"] == "GET is not allowed here: use POST" and "POST" in wrong.headers["Allow"]
    assert client.delete("/params").json["error"]["message"] == "DELETE is not allowed here: use GET"


# --- odd but valid images: converted, not rejected ---------------------------------------------------

def decoded(data: bytes) -> np.ndarray:
    return np.asarray(load_image(data, max_pixels=10_000_000))


def test_cmyk_jpeg_converts_to_the_same_colour():
    pixel = decoded(image_bytes(mode="CMYK", color=(0, 255, 0, 0), fmt="JPEG", quality=100))[0, 0]
    assert np.allclose(pixel, (255, 0, 255), atol=3)  # magenta


def test_transparent_png_and_palette_with_transparency_become_white():
    assert tuple(decoded(image_bytes(mode="RGBA", color=(255, 0, 0, 0)))[0, 0]) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    assert tuple(decoded(buffer.getvalue())[0, 0]) == (255, 255, 255)


def test_16_bit_greyscale_scales_to_8_bits():
    levels = np.array([[0, 32896, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    assert decoded(buffer.getvalue())[0, :, 0].tolist() == [0, 128, 255]


def rotated_jpeg() -> bytes:
    """A 128x64 JPEG whose EXIF says: rotate 90 degrees clockwise to show it (upright it is 64x128)."""
    image = Image.new("RGB", (128, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 64, 64))  # left half red: upright, the top half is red
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    upright = decoded(rotated_jpeg())
    assert upright.shape == (128, 64, 3)
    assert upright[10, 32, 0] > 200 and upright[118, 32, 2] > 200  # red on top, blue below


@pytest.mark.parametrize("data", [image_bytes(mode="CMYK", color=(0, 255, 0, 0), fmt="JPEG"),
                                  image_bytes(mode="RGBA", color=(0, 0, 0, 0)), image_bytes(mode="LA", color=(9, 9)),
                                  image_bytes(fmt="WEBP")], ids=["cmyk-jpeg", "rgba-png", "la-png", "webp"])
def test_odd_images_generate(client, data):
    response = client.post("/generate", data=upload(data, **SMALL))
    assert response.status_code == 200, response.json


def test_exif_rotated_jpeg_gives_an_upright_video(client):
    params = {k: v for k, v in SMALL.items() if k not in ("width", "height")}
    response = client.post("/generate", data=upload(rotated_jpeg(), name="photo.jpg", sizing="source",
                                                    format="webp", **params))
    assert response.status_code == 200, response.json
    with Image.open(io.BytesIO(response.data)) as video:
        assert video.size == (64, 128)


def test_a_request_whose_frames_would_pass_max_output_mb_is_refused_up_front_naming_them(make_app):
    """2048x2048 and 595 frames is about 7 GiB of frames (21+ GiB of RAM before): the default 4096 MiB refuses it."""
    client = make_app().test_client()
    long = {"num_frames": "25", "segments": "4", "loop": "pingpong", "output_fps": "18", "fps": "6"}
    refused = client.post("/generate", data=upload(image_bytes(), width="2048", height="2048", **long),
                          headers={"Prefer": "respond-async"})
    assert refused.status_code == 422, refused.json
    error = refused.json["error"]
    assert error["field"] == "width" and "MAX_OUTPUT_MB is 4096" in error["message"]
    assert "`width`, `height`, `num_frames`, `segments`, `loop`, `output_fps`" in error["message"]
    # The model's own size counts when the request leaves it: 256x144 x that many frames fits; a tighter budget not.
    assert client.post("/generate", data=upload(image_bytes(), **long, num_inference_steps="1"),
                       headers={"Prefer": "respond-async"}).status_code == 202
    tight = make_app(MAX_OUTPUT_MB="1").test_client()
    refused = tight.post("/generate", data=upload(image_bytes(), num_frames="14"))
    assert refused.status_code == 422 and refused.json["error"]["field"] == "num_frames"
    assert "14 frames of 256x144" in refused.json["error"]["message"]
