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


def load_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode, check and normalise an upload: EXIF orientation applied, converted to 8-bit RGB."""
    if not data:
        raise MissingImage("the image is empty", field="image")
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                                    f"{max_pixels} (MAX_IMAGE_PIXELS)", field="image")
            image.load()
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"the image exceeds the limit of {max_pixels} pixels", field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        log.info("an uploaded %s image did not decode: %s", fmt, exc)  # the reason goes to the log, not the client
        raise InvalidImage(f"the {fmt} image could not be decoded: it is truncated or corrupt", field="image") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip at 255 (what convert("L") would do).
        levels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(levels / 257.0, 0, 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # Transparent areas become white, as image viewers on a light background show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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
