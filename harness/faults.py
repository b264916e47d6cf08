"""Test-only fault injection: `HARNESS_TEST_KILL_AT=<point>[:<n>]` SIGKILLs the process the n-th
time (default the first) it reaches the named point, to prove that every crash resumes cleanly.

Points: `before-replace:<file name>` (a temp file is written and synced, not yet renamed into
place), `after-replace:<file name>` (renamed, nothing after it written), `train-batch` (inside an
epoch) and `final-evaluation` (after training, before the test-set evaluation). Unset in normal use:
then `reached` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "HARNESS_TEST_KILL_AT"
_seen: Counter[str] = Counter()


def reached(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "1")
    if name != point:
        return
    _seen[point] += 1
    if _seen[point] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
