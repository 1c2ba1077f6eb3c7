"""Benchmarks are not tests: these only smoke-run each script on tiny sizes so that none of them rots.

The scripts run one after another in the background lane (conftest.py), and each test checks its own output.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, image_bytes, lane_job, lane_result, upload

pytestmark = pytest.mark.slow

SCRIPTS = [
    ("encoding.py", [], ["ours mp4 (H.264)", "diffusers export_to_video", "GIF size vs export_to_gif"]),
    ("overhead.py", [], ["HTTP / bare", "| bare |", "| http |", "every HTTP answer `X-Cache: miss`"]),
    ("load.py", [], ["errors | 0 |", "first come, first served | yes", "/health latency", "load generator CPU",
                     "every submission `X-Cache: miss`", "more generations"]),
    ("gpu_stages.py", ["--model", "tiny"], ["| default |", "SVD_OFFLOAD=model | skipped", "decode_chunk_size=4",
                                            "cache_interval=3",
                                            re.compile(r"\| animatelcm-svd-xt, 4 steps, max_guidance_scale=1 \| none \| [\d.]+ s \|")]),
    # Every family's stages by the same clock: a prompt encoder timed, the block cache and tiling rows
    ("gpu_stages.py", ["--model", "tiny-wan"], [re.compile(r"\| default \| (?!0\.00)\d+\.\d\d s \| \d+\.\d\d s \|"), "| cache=fast |",
                                                "| VAE_TILING=true |", "SVD_OFFLOAD=group | skipped", "RTX 4090"]),
    ("animatelcm.py", [], ["| 4 | 2 | 8 | 8/50 = 0.16 |", "| 4 | 1 | 4 | 4/50 = 0.08 |", "projected A100 time"]),
    ("postprocess.py", [], ["interpolation 6 -> 24 fps", "| ping-pong |", "hit / first"]),
    ("families.py", [], ["| wan2.2-ti2v-5b | 520.7 | 100 | 52.1 |", "| ltx-video |", re.compile(r"\| tiny-wan \| 4 \| 8 \| [0-7] \|"), re.compile(r"\| tiny-ltx \| 4 \| 4 \| [0-3] \|")]),
    ("memory.py", [], [re.compile(r"\| mp4 \| 576 \| [\d.]+ MiB \| [\d.]+ MiB \| [\d.]+ \| yes \|"), "| gif |",
                       re.compile(r"\| 1 \| 1 \| 100 \|")]),
    ("full_size.py", [], ["projected A100 time", "| 64x64 | 3 |", "relative frame error"]),
    ("hostile.py", [], ["/health p99 with slow connections", "| PNG 16-bit grey |", "| WebP ("]),
    # Outside Redis, a finished task leaves its record only there: under 4 KB whatever the video
    ("result_store.py", [], [re.compile(r"\| folder \| 256x144 \| [\d.]+ MB \| [\d,]+ B \| -?[\d,]+ B \| yes \|"),
                             re.compile(r"\| s3 \| 256x144 \| [\d.]+ MB \| [\d,]+ B \| -?[\d,]+ B \| yes \|"),
                             "`RESULT_STORE=s3` through the API"]),
]


# One compute thread per script and the services it starts: a smoke run checks that a script works, not how fast,
# and it runs in the background lane beside the rest of the suite (conftest.py), one script at a time.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@lane_job("bench-smoke")
def smoke_runs(folder, tiny_model_dir):
    """Every script's `--smoke` run: script -> (exit code, stdout, stderr). Those that serve the tiny model serve
    the lane's folder (saved by diffusers' `save_pretrained`, as each script would)."""
    env = {**ONE_THREAD, "BENCH_TINY_MODEL": str(tiny_model_dir)}
    runs = {}
    for script, extra, _ in SCRIPTS:
        result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *extra], cwd=folder,
                                capture_output=True, text=True, timeout=600, check=False, env=env)
        runs[(script, *extra)] = (result.returncode, result.stdout, result.stderr)
    return runs


@pytest.mark.lane("bench-smoke")
@pytest.mark.parametrize("script,extra,needles", SCRIPTS)
def test_benchmark_runs(script, extra, needles):
    code, stdout, stderr = lane_result("bench-smoke")[(script, *extra)]
    assert code == 0, stderr[-3000:]
    for needle in needles:  # a string, or a pattern where a number varies
        assert needle.search(stdout) if isinstance(needle, re.Pattern) else needle in stdout, stdout


def _bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_timed_request_answered_from_the_cache_fails_the_benchmark(make_app):
    """The check every timed benchmark request passes through: a real hit from the service is refused."""
    common = _bench_common()
    client = make_app().test_client()  # the result cache is on, as a user runs it
    first = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=31))
    repeat = client.post("/generate", data=upload(image_bytes(), **SMALL, seed=31))
    assert common.generated(first) is first
    with pytest.raises(common.CacheHit, match="X-Cache: hit"):
        common.generated(repeat)



def test_every_benchmarks_section_says_when_and_on_which_commit_it_ran():
    sections = (ROOT / "BENCHMARKS.md").read_text().split("\n## ")[1:]
    assert len(sections) >= 8
    for section in sections:
        title = section.split("\n", 1)[0]
        assert re.search(r"^Ran \d{4}-\d{2}-\d{2}\b.*\bcommit [0-9a-f]{7,}", section, re.M), title
