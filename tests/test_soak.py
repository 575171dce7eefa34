"""Load: the short soak (16 workers x 50 rounds) in the default run; `make soak` runs 64 x 1000."""
from __future__ import annotations

import pytest

from wanps.bench.soak import SoakConfig, run_soak


@pytest.mark.timeout(300)
def test_short_soak_sixteen_workers_keep_every_invariant(tmp_path):
    result = run_soak(SoakConfig(workers=16, rounds=50, time_limit_s=240), tmp_path)
    assert result.invariants == "ok"
    assert result.rounds == 50 and result.rounds_per_s > 0
    assert result.server_peak_rss_mib > 0
