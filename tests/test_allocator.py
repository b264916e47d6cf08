"""harness.training.allocator: freed tensor memory stays in the process, so steps stop page-faulting."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from harness.training.allocator import allocator_state, keep_freed_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")


def minor_faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_reallocating_activations_stops_faulting_once_memory_is_kept():
    def steps():  # like a training step's activations: 8 x 4 MiB held together, then all freed
        for _ in range(10):
            live = [torch.empty(1 << 20).fill_(1.0) for _ in range(8)]
            del live

    assert keep_freed_memory() is True
    assert allocator_state() == {"keep_freed_memory": True}
    steps()  # the first step grows the heap once
    # with glibc's defaults the freed 32 MiB is trimmed off the heap each time, and all 81,920 pages
    # fault back in (measured: 81,600); kept, none do
    assert minor_faults_of(steps) < 800
