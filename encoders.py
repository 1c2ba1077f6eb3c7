"""Frames in, a video file out, per output format. The only module that talks to ffmpeg."""

from __future__ import annotations

import io
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass

import imageio_ffmpeg
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Format:
    name: str
    extension: str
    content_type: str
    # The file's size at most, as a share of its raw RGB frames: measured on random-noise frames (the least
    # compressible a model makes: 0.27 mp4, 0.20 webm, 0.46 gif, 0.23 webp, 1.00 frames ZIP), rounded up.
    worst_ratio: float = 1.0


FORMATS = {
    "mp4": Format("mp4", "mp4", "video/mp4", 0.3),
    "webm": Format("webm", "webm", "video/webm", 0.25),
    "gif": Format("gif", "gif", "image/gif", 0.5),
    "webp": Format("webp", "webp", "image/webp", 0.3),
    "frames": Format("frames", "zip", "application/zip", 1.05),
}

# ffmpeg output options per format. MP4: H.264 yuv420p (plays everywhere), moov before mdat so a browser
# starts playing before the whole file arrives.
_FFMPEG_ARGS = {
    "mp4": ["-c:v", "libx264", "-preset", "superfast", "-crf", "18", "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", "-f", "mp4"],
    "webm": ["-c:v", "libvpx-vp9", "-crf", "32", "-b:v", "0", "-cpu-used", "4", "-row-mt", "1",
             "-pix_fmt", "yuv420p", "-f", "webm"],
    "webp": ["-c:v", "libwebp_anim", "-lossless", "0", "-quality", "80", "-loop", "0", "-f", "webp"],
}


GIF_COLOURS = 224


class EncodingError(RuntimeError):
    """The encoder failed; the message is for the log, not the client."""


def encode_video(frames, fps: int, fmt: str, path: str) -> None:
    """Write `frames` to `path` as `fmt` at `fps` frames per second: an N x H x W x 3 uint8 RGB array, or any
    sized iterable of H x W x 3 frames with `height` and `width` (the post-steps' clips and streams), fed to the
    encoder a frame at a time, so that nothing here holds the whole video again."""
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8):
        raise ValueError(f"frames must be N x H x W x 3 uint8, got {frames.shape} {frames.dtype}")
    try:
        if fmt == "gif":
            _encode_gif(frames, fps, path)
        elif fmt == "frames":
            _write_frames_zip(frames, path)
        else:
            _encode_ffmpeg(frames, fps, _FFMPEG_ARGS[fmt], path)
    finally:
        close = getattr(iter(frames), "close", None) if not isinstance(frames, np.ndarray) else None
        if close is not None:
            close()  # a stream stopped half-way (an encoder error) stops its own processes


def _size(frames) -> tuple[int, int]:
    return (frames.shape[1], frames.shape[2]) if isinstance(frames, np.ndarray) else (frames.height, frames.width)


ENCODE_TIMEOUT = 600  # seconds for one video's encoding


def _encode_ffmpeg(frames, fps: int, output_args: list[str], path: str) -> None:
    height, width = _size(frames)
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
               *output_args, path]
    deadline = time.monotonic() + ENCODE_TIMEOUT
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            for frame in frames:
                if time.monotonic() > deadline:
                    raise EncodingError(f"ffmpeg took longer than {ENCODE_TIMEOUT} s")
                process.stdin.write(np.ascontiguousarray(frame).data)
            process.stdin.close()
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except BrokenPipeError:
            code = process.wait(timeout=30)
        except BaseException:
            process.kill()
            process.wait()
            raise
        if code != 0:
            errors.seek(0)
            raise EncodingError(f"ffmpeg exited {code}: {errors.read()[-500:].decode(errors='replace')}")


def _encode_gif(frames: np.ndarray, fps: int, path: str) -> None:
    # One palette for the whole clip (per-frame palettes flicker): median cut over a sample of pixels across
    # frames, refined by k-means, no dithering (dither noise costs PSNR and doubles the size). 224 colours:
    # smaller than diffusers' export_to_gif at better PSNR, in a tenth of its time (BENCHMARKS.md).
    sample = frames[::max(1, len(frames) // 8)] if isinstance(frames, np.ndarray) else frames.palette_sample(8)
    stride = max(1, min(sample.shape[1:3]) // 64)
    sample = sample[:, ::stride, ::stride]
    palette = Image.fromarray(sample.reshape(-1, sample.shape[2], 3)).quantize(
        GIF_COLOURS, method=Image.Quantize.MEDIANCUT, kmeans=1)
    # One frame at a time into Pillow (which keeps each as a palette image: a third of the RGB bytes).
    images = (Image.fromarray(np.asarray(f)).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames)
    # GIF delays are whole hundredths of a second: round the running timestamps, not each delay, so the
    # average rate is exact (8 fps alternates 12 and 13 hundredths).
    ticks = [round(i * 100 / fps) for i in range(len(frames) + 1)]
    durations = [10 * (b - a) for a, b in zip(ticks, ticks[1:])]
    next(images).save(path, format="GIF", save_all=True, append_images=images, duration=durations, loop=0,
                      disposal=1)


def _write_frames_zip(frames, path: str) -> None:
    """Lossless PNG frames `frame_0000.png`, ... in a ZIP, stored (PNG is compressed already)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, frame in enumerate(frames):
            png = io.BytesIO()
            Image.fromarray(np.asarray(frame)).save(png, format="PNG", compress_level=3)
            archive.writestr(f"frame_{index:04d}.png", png.getvalue())
