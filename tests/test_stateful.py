"""The lifecycle under random interleavings (Hypothesis stateful), on both backends. `make test` runs a few
examples; `make soak` runs many (SOAK_EXAMPLES)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from lifecycle_machines import EmbeddedMachine, RedisMachine

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("SOAK_EXAMPLES", "4"))
STEPS = int(os.environ.get("SOAK_STEPS", "10"))
RUNS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _run(machine, label: str) -> None:
    machine.totals = Counter()
    run_state_machine_as_test(machine, settings=RUNS)
    totals = machine.totals
    print(f"SOAK {label} | {totals['accepted']} | {totals['finished']} | {totals['failed']} | {totals['canceled']} "
          "| 0 | 0")


def test_embedded_histories_are_legal_and_every_task_ends():
    _run(EmbeddedMachine, "embedded, state machine")


def test_redis_histories_are_legal_and_every_task_ends(redis_server):
    RedisMachine.redis_url = redis_server.url
    _run(RedisMachine, "Redis, state machine")
