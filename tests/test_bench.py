"""Benchmarks are not tests: these only smoke-run each script on tiny sizes so that none of them rots."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,extra,needles", [
    ("encoding.py", [], ["ours mp4 (H.264)", "diffusers export_to_video", "GIF size vs export_to_gif"]),
    ("overhead.py", [], ["HTTP / bare", "| bare |", "| http |"]),
    ("load.py", [], ["errors | 0 |", "first come, first served | yes", "/health latency"]),
    ("gpu_stages.py", ["--model", "tiny"], ["| default |", "SVD_OFFLOAD=model | skipped", "decode_chunk_size=4",
                                            "cache_interval=3"]),
    ("postprocess.py", [], ["interpolation 6 -> 24 fps", "| ping-pong |", "hit / first"]),
    ("full_size.py", [], ["projected A100 time", "| 64x64 | 3 |", "relative frame error"]),
    ("hostile.py", [], ["/health p99 with slow connections", "| PNG 16-bit grey |", "| WebP ("]),
])
def test_benchmark_runs(script, extra, needles):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stdout, result.stdout
