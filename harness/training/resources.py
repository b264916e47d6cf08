"""What a training epoch cost the machine, and whether the machine was free while it was timed.

Every epoch entry of a run record carries `resources`: the process's CPU seconds, the machine's
1-minute load average before and after (the larger is kept), its CPU count, and the peak memory of
training (device memory on a GPU, resident memory of the process on the CPU). A timing taken while
other processes kept the CPUs busy is marked contended, and the report withholds cost verdicts
resting on it (`harness.reporting.claims_cost`).

Also here: the one-line answer to a GPU out-of-memory error, which measures the largest
per-device batch that fits instead of guessing.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Other processes' average CPU demand, in cores, above which a timing is "contended": half a core
# busy elsewhere already moved PGD-AT/clean step ratios on a 2-core machine by 10-20%.
CONTENTION_CORES = 0.5


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window: float = 2.0) -> float | None:
    """Cores the whole machine kept busy over `window` seconds (Linux; None elsewhere).

    Taken while this process sleeps, so all of it is someone else's: the probe for benchmarks whose
    variants spawn worker processes (Ray), whose CPU time `time.process_time` cannot see, so the load
    average during them would count the benchmark's own workers as other load.
    """
    first = _cpu_jiffies()
    time.sleep(window)
    second = _cpu_jiffies()
    if first is None or second is None or second[1] <= first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak device memory since the last reset on a GPU; the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return {
            "kind": "device",
            "bytes": int(torch.cuda.max_memory_allocated(device)),
            "reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "resident", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


@dataclass
class EpochMeter:
    """Start at the beginning of a timed region, `finish()` at its end (after synchronising)."""

    device: torch.device
    wall0: float = 0.0
    cpu0: float = 0.0
    load0: float | None = None

    def start(self) -> EpochMeter:
        reset_peak_memory(self.device)
        self.load0 = load_average()
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()
        return self

    def finish(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        loads = [v for v in (self.load0, load_average()) if v is not None]
        return {
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "load_1min": max(loads) if loads else None,
            "cpus": os.cpu_count(),
            "peak_memory": peak_memory(self.device),
        }


def other_load(resources: dict[str, Any]) -> float | None:
    """Cores other processes kept busy on average: the load average less this process's own use.

    On a GPU the process mostly waits for the device, so its CPU use is small and any load above it
    is someone else's; on the CPU the process's own threads account for cpu_seconds / wall_seconds.
    A measurement that spawned workers stores `other_cores` from idle probes instead (`busy_cores`).
    """
    if resources.get("other_cores") is not None:
        return float(resources["other_cores"])
    load, wall = resources.get("load_1min"), resources.get("wall_seconds") or 0.0
    if load is None or wall <= 0:
        return None
    return max(0.0, load - resources.get("cpu_seconds", 0.0) / wall)


def contended(resources: dict[str, Any] | None) -> bool | None:
    """True when other processes used more than CONTENTION_CORES; None when the record cannot say."""
    if not resources:
        return None
    others = other_load(resources)
    return None if others is None else others > CONTENTION_CORES


# --------------------------------------------------------------------------- out of memory


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def largest_fitting_batch(try_step: Callable[[int], None], failed: int) -> int | None:
    """Halve the per-device batch from `failed` until `try_step(n)` runs without running out of
    memory; None when not even one example fits. Each try frees cached blocks first."""
    n = failed // 2
    while n >= 1:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            try_step(n)
            return n
        except torch.OutOfMemoryError:
            n //= 2
    return None


def out_of_memory_message(device: torch.device, per_device: int, global_batch: int, fits: int | None) -> str:
    """One line: what ran out, what fits, and the command that keeps the algorithm's global batch."""
    where = f"{device.type} device" if device.type != "cuda" else torch.cuda.get_device_name(device)
    if fits is None:
        return (
            f"out of memory on {where}: not even 1 example per device fits a training step of this "
            f"defense and model; use a smaller --model"
        )
    gpus = math.ceil(global_batch / fits)
    return (
        f"out of memory on {where} training {per_device} examples per device; a batch of {fits} fits, "
        f"so run on {gpus} GPUs (`torchrun --nproc-per-node {gpus} -m harness run ...`) to keep the "
        f"global batch of {global_batch}"
    )
