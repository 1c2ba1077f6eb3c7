"""Soak: the lifecycle state machines (Hypothesis, both backends) and SIGKILL crash runs (both backends) at
length. `make soak` runs it through bench/run.py, which writes its section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from common import ROOT, table

LONG = {"SOAK_EXAMPLES": "150", "SOAK_STEPS": "25", "SOAK_CRASH_TASKS": "50", "SOAK_CRASH_KILLS": "6"}
SMOKE = {"SOAK_EXAMPLES": "2", "SOAK_STEPS": "5", "SOAK_CRASH_TASKS": "3", "SOAK_CRASH_KILLS": "1"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    env = {**os.environ, **(SMOKE if parser.parse_args().smoke else LONG)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                             "tests/test_stateful.py", "tests/test_crash.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False)
    lines = [line.split("SOAK ", 1)[1] for line in result.stdout.splitlines() if "SOAK " in line]
    rows = [re.split(r"\s*\|\s*", line) for line in lines]
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    print(f"{env['SOAK_EXAMPLES']} state-machine examples of up to {env['SOAK_STEPS']} steps per backend; "
          f"crash runs of {env['SOAK_CRASH_TASKS']} async tasks with {env['SOAK_CRASH_KILLS']} SIGKILLs per "
          f"backend. {time.monotonic() - started:.0f} s in all.\n")
    print(table(["run", "tasks accepted", "finished", "failed", "canceled", "illegal histories", "never ended"],
                rows))
    print(f"\npytest: `{summary}`")
    print("\n| goal | measured | target |\n|---|---|---|\n"
          f"| every history legal, every accepted task ended, every finished video downloads | "
          f"{'yes' if result.returncode == 0 else 'NO'} | yes |")
    if result.returncode != 0:
        print(f"\n```\n{result.stdout[-3000:]}\n```")
        sys.exit(1)


if __name__ == "__main__":
    main()
