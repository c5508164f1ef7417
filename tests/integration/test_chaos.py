"""The chaos tier, bounded: about a minute of random faults under a mixed workload, then every invariant over the
whole database (devtools/chaos.py lists them). `make chaos` runs the same for longer. A failure prints the
seed: `CHAOS_SEED=<seed> make chaos` repeats the run's choices."""

from __future__ import annotations

import os
import random

import pytest

from devtools.chaos import chaos_run, summary

pytestmark = pytest.mark.integration
SECONDS = float(os.environ.get("CHAOS_TEST_SECONDS") or 45)


def test_under_random_faults_every_invariant_holds(tmp_path):
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1, 10**6))
    with chaos_run(seed, SECONDS, data_dir=str(tmp_path)) as chaos:
        report = chaos.run()
    print(summary(report))
    assert report["faults_total"] > 0 and report["sessions"]["created"] > 0, summary(report)
    assert report["violations"] == [], summary(report)
