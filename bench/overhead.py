"""Service overhead: the bare in-process call (generate + encode) against the same request over HTTP.

Tiny pipeline, fixed seed and parameters; the two are run in turn (bare, HTTP, bare, ...) so that the
machine's noise hits both alike. The server's result cache is off and every HTTP answer is checked to be
`X-Cache: miss`: each round generates. Goal: HTTP / bare within 0.95-1.05.

    python bench/overhead.py [--smoke]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import requests
from common import Service, generated, table, tiny_model
from PIL import Image

from config import load_settings
from encoders import encode_video
from video_diffusion.media.images import fit_image
from video_diffusion.params import parse_params, resolve_defaults
from pipeline import load_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny request, two rounds: checks the script runs")
    args = parser.parse_args()
    rounds = 2 if args.smoke else 9
    request = {"seed": "1234"} | ({"width": "64", "height": "64", "num_inference_steps": "1"} if args.smoke else {})
    folder = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model = tiny_model(folder)
    image = Image.linear_gradient("L").convert("RGB").resize((512, 384))
    upload = io.BytesIO()
    image.save(upload, format="PNG")

    generator = load_generator(load_settings({"SVD_MODEL": str(model)}, dotenv_path=None))
    params = resolve_defaults(parse_params(request), generator.model.defaults)

    def bare() -> None:
        frames = generator.generate(fit_image(image, params["width"], params["height"], "crop"), params,
                                    lambda *_: None)
        encode_video(frames, params["fps"], "mp4", str(folder / "bare.mp4"))

    service = Service(folder, {"SVD_MODEL": str(model)})
    try:
        service.wait_ready()

        def http() -> None:
            response = requests.post(service.url + "/generate", data=request, timeout=600,
                                     files={"image": ("input.png", upload.getvalue(), "image/png")})
            generated(response).raise_for_status()

        bare(), http()  # warm-up
        times = {"bare": [], "http": []}
        for _ in range(rounds):
            for name, run in (("bare", bare), ("http", http)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    finally:
        service.stop()
    bare_s, http_s = statistics.median(times["bare"]), statistics.median(times["http"])
    what = (f"{params['width']}x{params['height']}, {params['num_frames']} frames, "
            f"{params['num_inference_steps']} steps, mp4; median of {rounds} alternating rounds, every HTTP answer "
            "`X-Cache: miss`")
    print(f"Tiny pipeline, {what}.\n\n" + table(
        ["path", "median", "min", "max"],
        [[name, f"{statistics.median(t):.3f} s", f"{min(t):.3f} s", f"{max(t):.3f} s"] for name, t in times.items()])
        + "\n\n" + table(["goal", "measured", "target"], [["HTTP / bare", f"{http_s / bare_s:.3f}", "0.95 – 1.05"]]))


if __name__ == "__main__":
    main()
