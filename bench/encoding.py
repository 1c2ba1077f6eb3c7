"""Our encoders against diffusers' export_to_video and export_to_gif on the same frames.

25 frames at 1024x576 of a moving synthetic scene (gradients, moving shapes, texture: neither noise nor flat
colour). For each: median encode time, bytes, PSNR of the decoded frames against the source, and for MP4
whether a browser can start playing at once (moov before mdat).

    python bench/encoding.py [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import decode, median_seconds, moov_before_mdat, psnr, table

from encoders import encode_video

FPS = 6


def moving_scene(frames: int, height: int, width: int) -> np.ndarray:
    """A camera pan over gradients with two moving discs and fine texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = (np.sin(x / 3.0) * np.sin(y / 5.0) * 12).astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        shift = 6 * i
        r = 128 + 100 * np.sin((x + shift) / 97.0) + texture
        g = 128 + 90 * np.cos((y - shift / 2) / 61.0) + texture
        b = 255 * ((x + y + 3 * shift) % 400) / 400.0
        image = np.stack([r, g, b], -1)
        for cx, cy, radius, colour in ((width * (0.2 + 0.02 * i), height * 0.5, height * 0.18, (250, 240, 60)),
                                       (width * 0.7, height * (0.2 + 0.025 * i), height * 0.12, (30, 40, 200))):
            inside = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
            image[inside] = colour
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def run(frames: np.ndarray, repeats: int) -> tuple[str, dict]:
    from diffusers.utils import export_to_gif, export_to_video
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bench-enc-"))
    floats = [f.astype(np.float32) / 255.0 for f in frames]
    pil = [Image.fromarray(f) for f in frames]
    candidates = [
        ("ours mp4 (H.264)", "mp4", lambda p: encode_video(frames, FPS, "mp4", p)),
        ("diffusers export_to_video", "mp4", lambda p: export_to_video(floats, p, fps=FPS)),
        ("ours gif (shared palette)", "gif", lambda p: encode_video(frames, FPS, "gif", p)),
        ("diffusers export_to_gif", "gif", lambda p: export_to_gif(pil, p, fps=FPS)),
        ("ours webm (VP9)", "webm", lambda p: encode_video(frames, FPS, "webm", p)),
        ("ours webp (animated)", "webp", lambda p: encode_video(frames, FPS, "webp", p)),
    ]
    rows, results = [], {}
    for index, (name, fmt, encode) in enumerate(candidates):
        path = str(folder / f"{index}.{fmt}")
        seconds = median_seconds(lambda: encode(path), repeats)
        data = Path(path).read_bytes()
        quality = psnr(decode(data, fmt), frames)
        ready = ("yes" if moov_before_mdat(data) else "no") if fmt == "mp4" else "—"
        results[name] = {"seconds": seconds, "bytes": len(data), "psnr": quality}
        rows.append([name, f"{seconds:.2f} s", f"{len(data) / 1024:.0f} KB", f"{quality:.2f} dB", ready])
    ours_mp4, theirs_mp4 = results["ours mp4 (H.264)"], results["diffusers export_to_video"]
    ours_gif, theirs_gif = results["ours gif (shared palette)"], results["diffusers export_to_gif"]
    goals = [
        ["MP4 time vs export_to_video", f"{ours_mp4['seconds'] / theirs_mp4['seconds']:.2f}x", "≤ 0.5x"],
        ["MP4 PSNR vs export_to_video", f"{ours_mp4['psnr'] - theirs_mp4['psnr']:+.2f} dB", "≥ 0"],
        ["GIF time vs export_to_gif", f"{ours_gif['seconds'] / theirs_gif['seconds']:.2f}x", "≤ 0.5x"],
        ["GIF size vs export_to_gif", f"{ours_gif['bytes'] / theirs_gif['bytes']:.2f}x", "≤ 1x"],
        ["GIF PSNR vs export_to_gif", f"{ours_gif['psnr'] - theirs_gif['psnr']:+.2f} dB", "≥ 0"],
    ]
    shape = f"{len(frames)} frames at {frames.shape[2]}x{frames.shape[1]}, median of {repeats}"
    text = (f"{shape}.\n\n" + table(["encoder", "time", "size", "PSNR", "browser starts at once"], rows)
            + "\n\n" + table(["goal", "measured", "target"], goals))
    return text, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny frames, one repeat: checks the script runs")
    args = parser.parse_args()
    # Sides divisible by 16: export_to_video (imageio) would otherwise resize, and PSNR would compare apples to pears.
    frames = moving_scene(25, 96, 160) if args.smoke else moving_scene(25, 576, 1024)
    text, _ = run(frames, 1 if args.smoke else 5)
    print(text)


if __name__ == "__main__":
    main()
