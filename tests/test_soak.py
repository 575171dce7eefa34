"""Load: the short soak (16 workers x 50 rounds) in the default run; `make soak` runs 64 x 1000.

Besides its invariants, the soak claims bounded memory (docs/operations.md, "Load"): after
warm-up the server process's RSS grows by no more than the byte budgets its configuration
sets. Read from /proc/PID/status of the real server process (VmRSS after the first tenth of
the training, VmHWM at the end).
"""
from __future__ import annotations

import math

import pytest

from wanps.bench.soak import SoakConfig, run_soak
from wanps.server.history import DEFAULT_HISTORY_MB
from wanps.server.service import ServerConfig
from wanps.worker.tasks import get_task

MIB = 1024 * 1024
PAIR_BYTES = 8  # a 4-byte index and a 4-byte value
# What the allocator and gRPC add on top of the parts below as the run goes on (glibc arenas,
# HTTP/2 buffers): measured 1-5 MiB over 16 x 50 to 16 x 1000 rounds, quiet and beside six
# busy loops.
ALLOCATOR_SLACK_MIB = 8


def server_growth_budget_bytes(config: SoakConfig, num_params: int) -> int:
    """What the server may add once training runs: the parts of docs/operations.md, "Server
    memory", that grow with rounds, at the sizes this soak configures."""
    n, d = config.workers, num_params
    tau_max = max(2, config.tau)  # what run_soak passes as --tau-max
    k = math.ceil(config.delta * d)  # pairs per push
    u = min(d, n * k)  # pairs of a round's delta, at most
    open_rounds = (tau_max + 1) * n * PAIR_BYTES * k
    stored_updates = n * PAIR_BYTES * k
    history = min(ServerConfig.history_rounds * PAIR_BYTES * u, DEFAULT_HISTORY_MB * MIB)
    closing_round = 2 * PAIR_BYTES * u + 28 * u  # its delta, encoded chunks, the sort's scratch
    arriving = n * PAIR_BYTES * k * 9 // 8  # one push in flight per worker, its buffer grown by 12.5%
    return open_rounds + stored_updates + history + closing_round + arriving


@pytest.mark.timeout(300)
def test_short_soak_sixteen_workers_keep_every_invariant_in_bounded_memory(tmp_path):
    config = SoakConfig(workers=16, rounds=50, time_limit_s=240)
    result = run_soak(config, tmp_path)
    assert result.invariants == "ok"
    assert result.rounds == 50 and result.rounds_per_s > 0
    num_params = sum(p.numel() for p in get_task("synthetic").build_model(0).parameters())
    budget_mib = server_growth_budget_bytes(config, num_params) / MIB + ALLOCATOR_SLACK_MIB
    assert result.server_rss_after_tenth_mib > 0, "no RSS sample after warm-up"
    growth_mib = result.server_peak_rss_mib - result.server_rss_after_tenth_mib
    assert growth_mib <= budget_mib, (
        f"server RSS grew {growth_mib:.1f} MiB after warm-up ({result.server_rss_after_tenth_mib:.0f} -> "
        f"{result.server_peak_rss_mib:.0f} MiB peak), over the {budget_mib:.1f} MiB its budgets allow")
