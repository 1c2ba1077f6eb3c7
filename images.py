"""Untrusted image bytes in, an upright RGB image out; and fitting that image to the output size."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import ImageTooLarge, InvalidImage, InvalidParameter, MissingImage, UnsupportedMediaType

log = logging.getLogger(__name__)

# Recognised by their bytes, never by a file name or a client's Content-Type. Pillow is only ever asked to
# open the one format the bytes announce, so EPS (Ghostscript), SVG or TIFF never reach a decoder.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)


def sniff_format(data: bytes) -> str:
    """PNG, JPEG or WEBP from the magic bytes; 415 for anything else."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise UnsupportedMediaType("the image must be PNG, JPEG or WebP (recognised by its content, not its name)",
                               field="image")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an upload from its header alone: format by its bytes, size checked, nothing decoded yet."""
    if not data:
        raise MissingImage("the image is empty", field="image")
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"the image exceeds the limit of {max_pixels} pixels", field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _undecodable(fmt, exc) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{max_pixels} (MAX_IMAGE_PIXELS)", field="image")
    # Every 8x8 block of a JPEG costs at least a bit: fewer bytes than that is a header claiming a size its
    # data does not have (libjpeg would fill the rest with grey without a word).
    if fmt == "JPEG" and len(data) < width * height / 1024:
        raise InvalidImage(f"the JPEG image is truncated: its header says {width}x{height}, its data is far too "
                           "short for that", field="image")
    return image


def decode_image(image: Image.Image, max_side: int) -> Image.Image:
    """Decode an opened upload to upright 8-bit RGB, at most `max_side` on its long side.

    Memory stays near one full-size decode: JPEGs decode at a reduced scale (draft); 16-bit images become 8-bit
    strip by strip; everything is reduced before any other full-size conversion (transparency, EXIF turn).
    """
    fmt = image.format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if fmt == "JPEG":
                image.draft("RGB", (max_side, max_side))
            image.load()
            exif = image.getexif()
            if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                image = _sixteen_to_eight(image)
            elif image.mode in ("P", "PA", "1"):
                image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
            image = ImageOps.exif_transpose(_with_exif(image, exif))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as exc:
        raise _undecodable(fmt, exc) from None
    if image.mode in ("RGBA", "LA", "La", "RGBa") or "transparency" in image.info:
        # Transparent areas become white, as image viewers on a light background show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(data: bytes, max_pixels: int, max_side: int = 2048) -> Image.Image:
    """`open_image` then `decode_image`."""
    return decode_image(open_image(data, max_pixels), max_side)


def _with_exif(image: Image.Image, exif: Image.Exif) -> Image.Image:
    """Carry the original's EXIF (its orientation) over to a converted copy, for exif_transpose."""
    if exif:
        image.info["exif"] = exif.tobytes()
    return image


def _undecodable(fmt: str, exc: BaseException) -> InvalidImage:
    log.info("an uploaded %s image did not decode: %s", fmt, exc)  # the reason goes to the log, not the client
    return InvalidImage(f"the {fmt} image could not be decoded: it is truncated or corrupt", field="image")


_STRIP_ROWS = 256


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) greyscale to 8-bit by scaling, not clipping at 255 as convert("L") does;
    a strip at a time, so no full-size float or 32-bit copy is ever made."""
    width, height = image.size
    out = Image.new("L", image.size)
    for top in range(0, height, _STRIP_ROWS):
        levels = np.asarray(image.crop((0, top, width, min(height, top + _STRIP_ROWS)))).astype(np.int64)
        scaled = (np.clip(levels, 0, 65535) * 255 + 32767) // 65535  # round(level / 257)
        out.paste(Image.fromarray(scaled.astype(np.uint8), "L"), (0, top))
    return out


def target_size(image_size: tuple[int, int], width: int, height: int, sizing: str,
                max_side: int = 2048) -> tuple[int, int]:
    """The output size for `sizing`: `crop` is width x height; `fit` and `source` snap to multiples of 64."""
    src_w, src_h = image_size
    if sizing == "crop":
        return width, height
    if sizing == "fit":
        scale = min(width / src_w, height / src_h)
        return max(64, int(src_w * scale) // 64 * 64), max(64, int(src_h * scale) // 64 * 64)
    size = (max(64, round(src_w / 64) * 64), max(64, round(src_h / 64) * 64))
    if max(size) > max_side:
        raise InvalidParameter(f"sizing=source: the image is {src_w}x{src_h}, more than {max_side} on a side once "
                               "rounded to 64 (MAX_DIMENSION); use sizing=fit or crop", field="sizing")
    return size


def fit_image(image: Image.Image, width: int, height: int, sizing: str) -> Image.Image:
    """Resize `image` to cover the target size of `sizing`, then centre-crop the overhang."""
    size = target_size(image.size, width, height, sizing)
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
