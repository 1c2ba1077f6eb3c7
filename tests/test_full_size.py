"""The full-size SVD-XT architecture (random weights) served through the real service: `pytest -m fullsize`.

Not in `make test`: it builds a 13 GB folder (once, outside the repository), holds 9.4 GB of RAM and takes about a
minute per step at 64x64 on two cores. bench/full_size.py reports the same at more sizes, into BENCHMARKS.md.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.fullsize


def test_full_size_cache_interval_3_skips_work_and_stays_close():
    import full_size
    from common import Service

    folder = full_size.DEFAULT_FOLDER
    full_size.build(folder)
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((512, 288)).save(buffer, format="PNG")
    service = Service(Path(tempfile.mkdtemp(prefix="test-full-size-")),
                      {"SVD_MODEL": str(folder), "JOB_TIMEOUT": "36000", "SYNC_TIMEOUT": "36000"})
    try:
        service.wait_ready(timeout=1800)
        runs = {i: full_size.run_one(service, buffer.getvalue(), 64, 64, 3, i) for i in (1, 3)}
    finally:
        service.stop()
    # Three steps (step 0 always computes everything): interval 3 computes the deep blocks once, not three times;
    # its frames differ a little from interval 1's. Seconds per step are BENCHMARKS.md's (timing is no test).
    assert all(len(run["frames"]) == 14 for run in runs.values())
    error = np.linalg.norm(runs[3]["frames"] - runs[1]["frames"]) / np.linalg.norm(runs[1]["frames"])
    assert 0 < error < 0.5
