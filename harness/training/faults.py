"""Test-only fault injection: `HARNESS_TEST_KILL_AT=<point>[:<n>]` SIGKILLs the process the n-th
time (default the first) it reaches the named point, to prove that every crash resumes cleanly;
`HARNESS_TEST_STOP_AT` (same syntax) SIGSTOPs it there instead, so a test can hold a process
mid-run (e.g. holding its lock) and `SIGCONT` it later. Never set them outside tests.

Points: `before-replace:<file name>` (a temp file is written and synced, not yet renamed into
place), `after-replace:<file name>` (renamed, nothing after it written), `train-batch` (inside an
epoch) and `final-evaluation` (after training, before the test-set evaluation). Unset in normal use:
then `reached` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ACTIONS = {"HARNESS_TEST_KILL_AT": signal.SIGKILL, "HARNESS_TEST_STOP_AT": signal.SIGSTOP}
_seen: Counter[tuple[str, str]] = Counter()


def reached(point: str) -> None:
    for env, sig in ACTIONS.items():
        spec = os.environ.get(env)
        if not spec:
            continue
        name, _, nth = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "1")
        if name != point:
            continue
        _seen[env, point] += 1
        if _seen[env, point] == int(nth):
            os.kill(os.getpid(), sig)
