"""`make test` reads neither the user's `.env` nor settings in their environment: tests set what they need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_a_dotenv_and_environment_settings_do_not_reach_the_tests(tmp_path):
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
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
