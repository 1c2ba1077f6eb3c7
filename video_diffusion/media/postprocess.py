"""Steps after the model, on frames (N x H x W x 3 uint8): colour matching of chained segments, loops, and the
change of frame rate. Each takes a clip and gives one, so every output format gets every option; none copies the
clip: a loop is indices over the generated frames, interpolation streams into the encoder.

Interpolation is ffmpeg's `minterpolate` (motion-compensated, no weights to download). A learned interpolator
(RIFE, FILM) would be another `Interpolator` behind the same `output_fps` parameter.
"""

from __future__ import annotations

import math
import os
import queue
import subprocess
import tempfile
import threading
import time
from typing import Callable, Iterator

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


# --- clips: frames by index, without copies -------------------------------------------------------------

class Clip:
    """A clip's frames by index over the arrays they come from, copying none: segments side by side, a ping-pong's
    way back as indices, a crossfade's dissolved frames the only new arrays. What the post-steps pass along, so
    that their memory is the generated frames plus what they really make (MAX_OUTPUT_MB, docs/operations.md)."""

    def __init__(self, parts, index: list[tuple[int, int]] | None = None, made: dict[int, np.ndarray] | None = None):
        self._parts = [parts] if isinstance(parts, np.ndarray) else list(parts)
        self._index = index if index is not None else [(p, i) for p, part in enumerate(self._parts)
                                                        for i in range(len(part))]
        self._made = made or {}
        self.height, self.width = self._parts[0].shape[1:3]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, j: int) -> np.ndarray:
        j = j + len(self) if j < 0 else j
        if j in self._made:
            return self._made[j]
        part, i = self._index[j]
        return self._parts[part][i]

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def select(self, positions: list[int]) -> Clip:
        """The frames at `positions` (in that order), still without copies."""
        return Clip(self._parts, [self._index[j] for j in positions],
                    {k: self._made[j] for k, j in enumerate(positions) if j in self._made})

    def held_bytes(self) -> int:
        """Bytes of the arrays this clip holds (each array once, however often it is shown)."""
        return sum(part.nbytes for part in self._parts) + sum(frame.nbytes for frame in self._made.values())

    def array(self) -> np.ndarray:
        return np.stack(list(self)) if len(self) else np.empty((0, self.height, self.width, 3), np.uint8)

    def palette_sample(self, count: int = 8) -> np.ndarray:
        step = max(1, len(self) // count)
        return np.stack([self[j] for j in range(0, len(self), step)])


# --- loops --------------------------------------------------------------------------------------------

def crossfade_length(frames: int) -> int:
    return max(1, round(frames / 4))


def looped(clip: Clip, loop: str) -> Clip:
    """`pingpong`: 0..N-1 then N-2..1, so that repeating the clip plays back and forth without a jump (indices:
    no frame copied). `crossfade`: the last k (about N/4) frames dissolve into the first frame, so the end flows
    into the start; the frame count stays N (k new frames)."""
    n = len(clip)
    if loop == "pingpong":
        return clip.select([*range(n), *range(n - 2, 0, -1)])
    if loop == "crossfade":
        k = crossfade_length(n)
        first = clip[0].astype(np.float32)
        made = {}
        for j in range(k):
            weight = (j + 1) / (k + 1)  # the seam back to frame 0 is no bigger than any step of the dissolve
            index = n - k + j
            made[index] = np.round((1 - weight) * clip[index].astype(np.float32) + weight * first).astype(np.uint8)
        return Clip(clip._parts, list(clip._index), {**clip._made, **made})
    return clip


def make_loop(frames: np.ndarray, loop: str) -> np.ndarray:
    """`looped` on an array, as an array (for callers that hold one)."""
    return looped(Clip(frames), loop).array()


# --- colour matching of chained segments -------------------------------------------------------------

CHUNK = 8  # frames per step of the colour work: its float32 copies stay a few frames, not the clip


def colour_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over a whole clip (summed a few frames at a time)."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(frames), CHUNK):
        pixels = frames[start:start + CHUNK].reshape(-1, 3).astype(np.float64)
        total += pixels.sum(axis=0)
        squares += np.square(pixels).sum(axis=0)
        count += len(pixels)
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))


def match_colours(frames: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Shift and scale each channel so the clip's mean and spread equal `reference`'s (Reinhard et al. 2001,
    per RGB channel): chained segments drift in colour and saturation, and this pulls them back. In place, a few
    frames at a time."""
    mean, std = colour_stats(frames)
    ref_mean, ref_std = reference
    scale = np.where(std > 1e-6, ref_std / np.maximum(std, 1e-6), 1.0).astype(np.float32)
    shift = (ref_mean - mean * scale).astype(np.float32)
    for start in range(0, len(frames), CHUNK):
        chunk = frames[start:start + CHUNK].astype(np.float32) * scale + shift
        frames[start:start + CHUNK] = np.clip(np.round(chunk), 0, 255)
    return frames


# --- frame rate ---------------------------------------------------------------------------------------

class Stream:
    """Frames made on the way into the encoder (interpolated): a length, a size, and one pass in order."""

    def __init__(self, count: int, source: Clip, frames):
        self._count, self._frames, self.source = count, frames, source
        self.height, self.width = source.height, source.width

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        return iter(self._frames)

    def palette_sample(self, count: int = 8) -> np.ndarray:
        return self.source.palette_sample(count)  # in-betweens are blends of the source frames

    def array(self) -> np.ndarray:
        return np.stack(list(self))


Interpolator = Callable[[Clip, int, int, bool], "Iterator[np.ndarray]"]


def retimed(clip: Clip, fps: int, output_fps: int, looped: bool, interpolate: Interpolator | None = None):
    """`clip` at `fps` as frames at `output_fps` with the same duration (N / fps seconds): a Clip when slower
    (frames dropped evenly), a Stream when faster (in-betweens made by `interpolate` on the way into the encoder,
    motion compensation by default; for a loop, those after the last frame lead into the first)."""
    if output_fps == fps:
        return clip
    count = retimed_frames(len(clip), fps, output_fps)
    if output_fps < fps:
        return clip.select([min(len(clip) - 1, (j * fps) // output_fps) for j in range(count)])

    def frames():
        last = None
        made = (interpolate or motion_interpolate)(clip, fps, output_fps, looped)
        try:
            for j in range(count):
                frame = next(made, None)
                last = frame if frame is not None else last  # the filter ends early on some rates: hold the last
                # Where an output instant is a source frame's, it is that frame exactly.
                yield clip[j * fps // output_fps] if (j * fps) % output_fps == 0 else last
        finally:
            if hasattr(made, "close"):
                made.close()

    return Stream(count, clip, frames())


def retime(frames: np.ndarray, fps: int, output_fps: int, looped: bool,
           interpolate: Interpolator | None = None) -> np.ndarray:
    """`retimed` on an array, as an array (for callers that hold one)."""
    out = retimed(Clip(frames) if isinstance(frames, np.ndarray) else frames, fps, output_fps, looped, interpolate)
    return out.array()


# Interpolation runs in chunks side by side (ffmpeg's minterpolate uses one core). Each chunk starts and ends on a
# source frame that is also an output instant, and reads OVERLAP source frames past each end so that its motion
# search sees what a single pass sees there; only its own output frames are kept, so the joined clip has the
# single pass's frame count and source frames, within a fraction of a dB of its in-betweens (tests).
OVERLAP = 3
MIN_CHUNK = 8  # source frames: below this a chunk is more overlap than work
MEMORY_SHARE = 1.4  # of the output frames' bytes: source held + chunks waiting their turn stay under it


def interpolation_chunks(source_frames: int, fps: int, output_fps: int, cores: int, held_bytes: int,
                         output_bytes: int) -> list[int]:
    """Where the chunks start (source frame indices) and, last, the end: as many chunks as cores, while each has
    MIN_CHUNK frames and the outputs waiting their turn (all chunks but the one streaming) fit the memory share."""
    align = fps // math.gcd(fps, output_fps)  # source frames between instants shared with the output
    best = 1
    for count in range(2, max(1, cores) + 1):
        waiting = output_bytes * (count - 1) / count
        if source_frames // count < MIN_CHUNK or held_bytes + waiting > MEMORY_SHARE * output_bytes:
            break
        best = count
    starts = {round(source_frames * k / best / align) * align for k in range(best)}
    return [*sorted(b for b in starts if b < source_frames), source_frames]


def motion_interpolate(clip: Clip, fps: int, output_fps: int, looped: bool, cores: int | None = None):
    """ffmpeg `minterpolate`: motion-compensated in-betweens, in order, streamed. The filter stops one source
    frame before the end, so the clip gets two more first: the last held, or for a loop the first two again, so
    that the in-betweens after the last frame exist (leading into the start for a loop) and the duration holds.
    Chunks run side by side (see interpolation_chunks); the first streams, the others wait in memory."""
    n = len(clip)
    tail = [clip[0], clip[1 % n]] if looped else [clip[-1], clip[-1]]

    def source(j: int) -> np.ndarray:
        return clip[j] if j < n else tail[j - n]

    count = retimed_frames(n, fps, output_fps)
    frame_bytes = clip.height * clip.width * 3
    bounds = interpolation_chunks(n, fps, output_fps, cores or os.cpu_count() or 1, clip.held_bytes(),
                                  count * frame_bytes)
    align = fps // math.gcd(fps, output_fps)
    jobs = []
    try:
        for k, (begin, end) in enumerate(zip(bounds, bounds[1:])):
            last = k == len(bounds) - 2
            first_in = max(0, begin - align * math.ceil(OVERLAP / align))  # on a shared instant, like `begin`
            stop_in = n + 2 if last else min(n + 2, end + OVERLAP)
            skip = (begin - first_in) * output_fps // fps
            keep = (count if last else end * output_fps // fps) - begin * output_fps // fps
            jobs.append(_Minterpolate([source(j) for j in range(first_in, stop_in)], fps, output_fps,
                                      clip.width, clip.height, skip, keep, streaming=k == 0))
        for job in jobs:
            yield from job.frames()
    finally:
        for job in jobs:
            job.stop()


class _Minterpolate:
    """One ffmpeg minterpolate process over `frames`: fed from a thread, its output read by another, the frames
    from `skip` on, `keep` of them, handed over in order (a short queue when streaming, else all that come)."""

    def __init__(self, frames: list[np.ndarray], fps: int, output_fps: int, width: int, height: int, skip: int,
                 keep: int, streaming: bool):
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
                   # yuv444p: minterpolate works on YUV; 4:4:4 keeps the colour resolution. scd=none: generated
                   # clips have no cuts, and a false "scene change" would duplicate frames instead.
                   "-vf", f"format=yuv444p,minterpolate=fps={output_fps}:mi_mode=mci:mc_mode=aobmc:"
                          "me_mode=bidir:vsbmc=1:scd=none,format=rgb24",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
        self._shape, self._skip, self._keep = (height, width, 3), skip, keep
        self._out: queue.Queue = queue.Queue(maxsize=8 if streaming else 0)
        self._errors = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors)
        self._feeder = threading.Thread(target=self._feed, args=(frames,), name="minterpolate-in", daemon=True)
        self._reader = threading.Thread(target=self._read, name="minterpolate-out", daemon=True)
        self._stopped = threading.Event()
        self._feeder.start()
        self._reader.start()

    def _feed(self, frames: list[np.ndarray]) -> None:
        try:
            for frame in frames:
                self._process.stdin.write(np.ascontiguousarray(frame).data)
            self._process.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the process ended (or was stopped): its exit status says what happened

    def _read(self) -> None:
        size = int(np.prod(self._shape))
        index = self.kept = 0
        try:
            while index < self._skip + self._keep and not self._stopped.is_set():
                data = self._process.stdout.read(size)
                if len(data) < size:
                    break
                if index >= self._skip:
                    self._out.put(np.frombuffer(data, np.uint8).reshape(self._shape))
                    self.kept += 1
                index += 1
        finally:
            self._out.put(None)

    def frames(self):
        """Exactly `keep` frames: a chunk the filter ends early holds its last frame, so the next chunk's frames
        stay at their instants."""
        deadline, last, handed = time.monotonic() + 600, None, 0
        while True:
            try:
                frame = self._out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise EncodingError("minterpolate took longer than 600 s") from None
            if frame is None:
                break
            last, handed = frame, handed + 1
            yield frame
        self._process.stdout.close()  # all it had, or all we need: a process still writing ends on the closed pipe
        code = self._process.wait(timeout=30)
        if code != 0 and self.kept < self._keep and not self._stopped.is_set():
            self._errors.seek(0)
            raise EncodingError(f"minterpolate exited {code}: {self._errors.read()[-500:].decode(errors='replace')}")
        for _ in range(self._keep - handed if last is not None else 0):
            yield last

    def stop(self) -> None:
        self._stopped.set()
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        self._errors.close()
