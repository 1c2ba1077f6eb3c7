"""Untrusted image bytes in, an upright RGB image out; and fitting that image to the output size."""

from __future__ import annotations

import io
import logging
import warnings
from functools import partial

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from video_diffusion.errors import ImageTooLarge, InvalidImage, InvalidParameter, MissingImage, UnsupportedMediaType

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


# Pillow decodes a WebP whole, through two full-size buffers (~15 bytes a pixel at its peak), where a PNG
# takes one and a JPEG decodes at a reduced scale: WebP gets this share of MAX_IMAGE_PIXELS.
WEBP_SHARE = 4


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an upload from its header alone: format by its bytes, size checked, nothing decoded yet."""
    if not data:
        raise MissingImage("the image is empty", field="image")
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():  # the size is checked below, against MAX_IMAGE_PIXELS, not Pillow's default
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError:  # past Pillow's own hard limit, which MAX_IMAGE_PIXELS stays under
        raise ImageTooLarge(f"the image exceeds the limit of {max_pixels} pixels", field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _undecodable(fmt, exc) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{max_pixels} (MAX_IMAGE_PIXELS)", field="image")
    # Every 8x8 block of a JPEG costs at least a bit: fewer bytes than that is a header claiming a size its
    # data does not have (libjpeg would fill the rest with grey without a word).
    if fmt == "WEBP" and width * height > max_pixels // WEBP_SHARE:
        raise ImageTooLarge(f"the WebP image is {width}x{height} = {width * height} pixels; WebP images are decoded "
                            f"whole, so their limit is MAX_IMAGE_PIXELS/{WEBP_SHARE} = {max_pixels // WEBP_SHARE}",
                            field="image")
    if fmt == "JPEG" and len(data) < width * height / 1024:
        raise InvalidImage(f"the JPEG image is truncated: its header says {width}x{height}, its data is far too "
                           "short for that", field="image")
    return image


def decode_image(image: Image.Image, max_side: int) -> Image.Image:
    """Decode an opened upload to upright 8-bit RGB, at most `max_side` on its long side.

    Memory stays near one full-size decode: JPEGs decode at a reduced scale (draft); everything else is
    converted and box-reduced a strip at a time, so no second full-size copy (float, 32-bit, premultiplied
    alpha) is ever made; transparency and the EXIF turn are applied to the small result.
    """
    fmt = image.format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if fmt == "JPEG":
                image.draft("RGB", (max_side, max_side))
            image.load()
            exif = image.getexif()
            image = _reduce_in_strips(image, max(1, max(image.size) // max_side))
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


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _reduce_in_strips(image: Image.Image, factor: int) -> Image.Image:
    """`image` in a mode that reduces cleanly (8-bit), box-reduced by `factor`, one strip of rows at a time."""
    if image.mode in _SIXTEEN_BIT:
        convert = _sixteen_to_eight
    elif image.mode in ("P", "PA", "1"):  # palette transparency needs the whole image's info: kept per strip
        target = "RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB"
        convert = partial(Image.Image.convert, mode=target)
    elif factor == 1:
        return image
    else:
        convert = _unchanged
    width, height = image.size
    rows = factor * max(1, 256 // factor)
    out = None
    for top in range(0, height, rows):
        piece = convert(image.crop((0, top, width, min(height, top + rows))))
        if factor > 1:
            piece = piece.reduce(factor)
        if out is None:
            out = Image.new(piece.mode, (-(-width // factor), -(-height // factor)))
        out.paste(piece, (0, top // factor))
    return out


def _unchanged(piece: Image.Image) -> Image.Image:
    return piece


def _sixteen_to_eight(piece: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) greyscale to 8-bit by scaling, not clipping at 255 as convert("L") does."""
    levels = np.asarray(piece).astype(np.int64)
    return Image.fromarray(((np.clip(levels, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")


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
