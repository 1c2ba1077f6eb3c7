"""Steps after the model, on frames (N x H x W x 3 uint8): colour matching of chained segments, loops, and the
change of frame rate. Each takes frames and gives frames, so every output format gets every option.

Interpolation is ffmpeg's `minterpolate` (motion-compensated, no weights to download). A learned interpolator
(RIFE, FILM) would be another `Interpolator` behind the same `output_fps` parameter.
"""

from __future__ import annotations

import subprocess
from typing import Callable

import imageio_ffmpeg
import numpy as np

from encoders import EncodingError

# --- counting (what admission checks against MAX_OUTPUT_FRAMES) ---------------------------------------

def chained_frames(num_frames: int, segments: int) -> int:
    """Each segment after the first drops its first frame, which re-renders its conditioning image."""
    return num_frames + (segments - 1) * (num_frames - 1)


def looped_frames(frames: int, loop: str) -> int:
    return 2 * frames - 2 if loop == "pingpong" else frames


def retimed_frames(frames: int, fps: int, output_fps: int) -> int:
    """Frames at `output_fps` that last as long as `frames` at `fps` (N / fps seconds)."""
    return frames if output_fps == fps else max(1, round(frames * output_fps / fps))


def output_frames(num_frames: int, segments: int, loop: str, fps: int, output_fps: int) -> int:
    return retimed_frames(looped_frames(chained_frames(num_frames, segments), loop), fps, output_fps)


# --- loops --------------------------------------------------------------------------------------------

def crossfade_length(frames: int) -> int:
    return max(1, round(frames / 4))


def make_loop(frames: np.ndarray, loop: str) -> np.ndarray:
    """`pingpong`: 0..N-1 then N-2..1, so that repeating the clip plays back and forth without a jump.
    `crossfade`: the last k (about N/4) frames dissolve into the first frame, so the end flows into the start;
    the frame count stays N."""
    if loop == "pingpong":
        return np.concatenate([frames, frames[-2:0:-1]])
    if loop == "crossfade":
        k = crossfade_length(len(frames))
        out = frames.copy()
        first = frames[0].astype(np.float32)
        for j in range(k):
            weight = (j + 1) / (k + 1)  # the seam back to frame 0 is no bigger than any step of the dissolve
            index = len(frames) - k + j
            out[index] = np.round((1 - weight) * frames[index].astype(np.float32) + weight * first).astype(np.uint8)
        return out
    return frames


# --- colour matching of chained segments -------------------------------------------------------------

def colour_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over a whole clip."""
    pixels = frames.reshape(-1, 3).astype(np.float64)
    return pixels.mean(axis=0), pixels.std(axis=0)


def match_colours(frames: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Shift and scale each channel so the clip's mean and spread equal `reference`'s (Reinhard et al. 2001,
    per RGB channel): chained segments drift in colour and saturation, and this pulls them back."""
    mean, std = colour_stats(frames)
    ref_mean, ref_std = reference
    scale = np.where(std > 1e-6, ref_std / np.maximum(std, 1e-6), 1.0)
    matched = (frames.astype(np.float32) - mean.astype(np.float32)) * scale.astype(np.float32) + ref_mean.astype(
        np.float32)
    return np.clip(np.round(matched), 0, 255).astype(np.uint8)


# --- frame rate ---------------------------------------------------------------------------------------

Interpolator = Callable[[np.ndarray, int, int, bool], np.ndarray]


def retime(frames: np.ndarray, fps: int, output_fps: int, looped: bool,
           interpolate: Interpolator | None = None) -> np.ndarray:
    """`frames` at `fps` as frames at `output_fps` with the same duration (N / fps seconds).

    Slower: frames dropped evenly. Faster: in-betweens made by `interpolate` (motion compensation by default);
    for a loop, the in-betweens after the last frame lead into the first, so the seam is interpolated too.
    """
    if output_fps == fps:
        return frames
    count = retimed_frames(len(frames), fps, output_fps)
    if output_fps < fps:
        return frames[[min(len(frames) - 1, (j * fps) // output_fps) for j in range(count)]]
    out = (interpolate or motion_interpolate)(frames, fps, output_fps, looped)
    if len(out) < count:  # the filter ends early on some rates: hold the last frame
        out = np.concatenate([out, np.repeat(out[-1:], count - len(out), axis=0)])
    out = out[:count]
    for j in range(count):  # where an output instant is a source frame's, it is that frame exactly
        if (j * fps) % output_fps == 0:
            out[j] = frames[j * fps // output_fps]
    return out


def motion_interpolate(frames: np.ndarray, fps: int, output_fps: int, looped: bool) -> np.ndarray:
    """ffmpeg `minterpolate`: motion-compensated in-betweens. The filter stops one source frame before the end,
    so the clip gets two more first: the last held, or for a loop the first two again, so that the in-betweens
    after the last frame exist (leading into the start for a loop) and the duration holds."""
    tail = frames[:2] if looped else np.repeat(frames[-1:], 2, axis=0)
    source = np.ascontiguousarray(np.concatenate([frames, tail]))
    _, height, width, _ = source.shape
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
               # yuv444p: minterpolate works on YUV; 4:4:4 keeps the colour resolution. scd=none: SVD clips
               # have no cuts, and a false "scene change" would duplicate frames instead.
               "-vf", f"format=yuv444p,minterpolate=fps={output_fps}:mi_mode=mci:mc_mode=aobmc:me_mode=bidir:"
                      "vsbmc=1:scd=none,format=rgb24",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    result = subprocess.run(command, input=source.tobytes(), capture_output=True, timeout=600, check=False)
    if result.returncode != 0:
        raise EncodingError(f"minterpolate exited {result.returncode}: "
                            f"{result.stderr.decode(errors='replace')[-500:]}")
    frame_bytes = height * width * 3
    count = len(result.stdout) // frame_bytes
    return np.frombuffer(result.stdout[:count * frame_bytes], np.uint8).reshape(count, height, width, 3).copy()
