"""Wire rules every wanps process agrees on that need no tensors (torch-free: the controller
and the rpc layer import this, not the codec)."""
from __future__ import annotations

# 128Ki elements per chunk: 512 KiB of indices + 512 KiB of float32 values.
CHUNK_ELEMENTS = 128 * 1024
# Indices are viewed as int32, so a model must stay below this many parameters.
MAX_PARAMS = 2**31 - 1
# The most link samples one ReportRequest carries: workers send no more, the controller refuses more.
MAX_SAMPLES_PER_REPORT = 512
# The largest staleness any part accepts: the server's --tau-max (it holds tau_max + 1 open
# rounds), the controller's --tau/--tau-max and SetPolicy's tau, a decision on the wire, a
# worker's --tau. Far beyond any useful value; it keeps a typo (or a uint32 of -1) out.
MAX_TAU = 1024


class WireError(ValueError):
    """A payload that breaks the wire rules. The message says which rule and why."""
