"""`make bench`: run every benchmark here on this machine and rewrite BENCHMARKS.md with the results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [("Service overhead", "overhead.py", []), ("Encoders against diffusers", "encoding.py", []),
              ("Load", "load.py", []),
              ("GPU stages", "gpu_stages.py", ["--model", os.environ.get("BENCH_MODEL", "tiny")]),
              ("GPU stages: Wan", "gpu_stages.py", ["--model", os.environ.get("BENCH_WAN_MODEL", "tiny-wan")]),
              ("GPU stages: LTX-Video", "gpu_stages.py", ["--model", os.environ.get("BENCH_LTX_MODEL", "tiny-ltx")]),
              ("Hostile clients", "hostile.py", []), ("Post-steps and the result cache", "postprocess.py", []),
              ("Full-size architecture: cache_interval", "full_size.py", []),
              ("AnimateLCM: UNet work per video", "animatelcm.py", []),
              ("Wan and LTX-Video: transformer work with cache=fast", "families.py", []),
              ("Post-steps: memory against the frames, interpolation against cores", "memory.py", []),
              ("Result stores: Redis memory and downloads", "result_store.py", []),
              ("Soak: lifecycle and crashes", "soak.py", [])]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal")) / 2**20
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} x {cpu}, {memory:.0f} GiB RAM, GPU: {gpu}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def commit() -> str:
    """The commit the benchmarks run on, marked when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                              check=False).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _sections(text: str) -> dict[str, str]:
    """BENCHMARKS.md's `## ` sections by title."""
    parts = text.split("\n## ")[1:]
    return {part.split("\n", 1)[0]: "## " + part.rstrip("\n") + "\n" for part in parts}


def main() -> None:
    """Run the benchmarks named on the command line by script (all without names); keep the other sections."""
    chosen = sys.argv[1:]
    path = HERE.parent / "BENCHMARKS.md"
    sections = _sections(path.read_text()) if path.exists() else {}
    header = ("# Benchmarks\n\nWritten by `make bench` (`python bench/run.py [script ...]`), which rewrites only the "
              "sections it runs: each section says the date, the commit and the machine it ran on.\n\n"
              "Shared, noisy machines: every goal is a ratio of two things measured side by side in the same run, "
              "with medians over repeated runs.\n\nWhat runs where: every section here ran on the CPU machine named in "
              "it, on the tiny random-weight models (the full-size section: SVD-XT's architecture with random weights, on "
              "that CPU), except the FLOP counts (the real configs on fake tensors). Real "
              "step times and peak GPU memory need a CUDA machine: `python bench/gpu_stages.py --model <name> "
              "--random-weights` builds svd-xt, wan2.2-ti2v-5b, wan2.1-i2v-14b-480p/720p or ltx-video from the "
              "published configs there, with no download. None was measured here.\n")
    ran_on = f"{commit()} (machine: {machine()})"
    for title, script, extra in BENCHMARKS:
        if chosen and script not in chosen:
            continue
        command = ["python", f"bench/{script}", *extra]
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(HERE / script), *extra], capture_output=True, text=True,
                                check=False)
        output = result.stdout.strip() if result.returncode == 0 else f"Failed:\n\n```\n{result.stderr[-3000:]}\n```"
        sections[title] = (f"## {title}\n\nCommand: `{' '.join(command)}` ({time.monotonic() - started:.0f} s)\n\n"
                           f"Ran {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on commit {ran_on}.\n\n"
                           f"{output}\n")
        print(f"{title}: done", file=sys.stderr)
    order = [title for title, _, _ in BENCHMARKS]
    ordered = sorted(sections, key=lambda t: order.index(t) if t in order else len(order))
    path.write_text("\n".join([header, *(sections[t] for t in ordered)]))


if __name__ == "__main__":
    main()
