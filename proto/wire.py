"""Wire rules every wanps process agrees on that need no tensors (torch-free: the controller
and the rpc layer import this, not the codec)."""
from __future__ import annotations

import unicodedata

# 128Ki elements per chunk: 512 KiB of indices + 512 KiB of float32 values.
CHUNK_ELEMENTS = 128 * 1024
# Indices are viewed as int32, so a model must stay below this many parameters.
MAX_PARAMS = 2**31 - 1
# The most link samples one ReportRequest carries: workers send no more, the controller refuses more.
MAX_SAMPLES_PER_REPORT = 512
# The most padding a bandwidth probe carries either way (a Ping's padding, or the bytes its
# reply is asked to carry): a probe stays one bounded message, and a caller cannot make the
# server send more than this per call.
MAX_PROBE_BYTES = 1024 * 1024

# The largest staleness any part accepts: the server's --tau-max (it holds tau_max + 1 open
# rounds), the controller's --tau/--tau-max and SetPolicy's tau, a decision on the wire, a
# worker's --tau. Far beyond any useful value; it keeps a typo (or a uint32 of -1) out.
MAX_TAU = 1024


class WireError(ValueError):
    """A payload that breaks the wire rules. The message says which rule and why."""


# A member's name (JoinRequest.name) goes into server logs: bounded, and one line of plain text.
MAX_NAME_CHARS = 64
# Unicode categories refused in names: control (Cc: newline, escape), format (Cf: bidi overrides
# that reorder a log line), surrogates, private use and unassigned (Cs, Co, Cn), line and
# paragraph separators (Zl, Zp).
REFUSED_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a member's name, or None. The message never repeats the name."""
    if len(name) > MAX_NAME_CHARS:
        return f"name has {len(name)} characters; at most {MAX_NAME_CHARS}"
    for position, char in enumerate(name):
        if unicodedata.category(char) in REFUSED_NAME_CATEGORIES:
            return f"name has a control or non-printing character (U+{ord(char):04X}) at position {position}"
    return None
