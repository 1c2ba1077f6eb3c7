"""`make test` reads neither the user's `.env` nor settings in their environment: tests set what they need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, lane_job, lane_result

pytestmark = pytest.mark.slow


@lane_job("isolation")
def run_a_test_in_a_configured_copy(tmp_path, _tiny_model_dir):
    """A copy of the project with a `.env` and the same settings in the environment, running one real test:
    (exit code, stdout, stderr)."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git", "data", "test-output", "__pycache__",
                                                                 ".env"))
    harmless = "VIDEO_FRAMES=16\nVIDEO_WIDTH=512\nVIDEO_HEIGHT=512\nMAX_QUEUE=1\n"
    (project / ".env").write_text(harmless)
    env = {**os.environ, **dict(line.split("=") for line in harmless.split())}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_e2e.py::test_demo_script_submits_follows_and_downloads"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.lane("isolation")
def test_a_dotenv_and_environment_settings_do_not_reach_the_tests():
    code, stdout, stderr = lane_result("isolation")
    assert code == 0, stdout[-3000:] + stderr[-2000:]
    assert "1 passed" in stdout
