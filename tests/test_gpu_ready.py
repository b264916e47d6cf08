"""GPU-ready training loop, checked on the CPU: no host read per step, resources recorded, OOM in one line."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from harness.core.errors import HarnessError
from harness.training.runner import run
from harness.training.specs import make_spec

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}


class HostReads(TorchFunctionMode):
    """Counts tensor operations that copy a value to the host (a GPU sync each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_pass_reads_the_device_once_per_statistic_not_per_step(tmp_path, run_options):
    reads = []

    @contextlib.contextmanager
    def count_host_reads(pass_index):
        with HostReads() as mode:
            yield
        reads.append(mode.count)

    record = run(make_spec("pgd-at", "synthetic", "smoke"), run_options(tmp_path, around_pass=count_host_reads))
    (entry,), (host_reads,) = record["epochs"], reads
    assert entry["minibatches"] == 4 and host_reads <= len(entry["train"])  # the pass's means, read once at its end
    resources = entry["resources"]
    assert resources["peak_memory"]["kind"] == "resident" and resources["peak_memory"]["bytes"] > 2**20
    assert resources["cpu_seconds"] > 0 and resources["cpus"] >= 1 and "load_1min" in resources
    assert entry["cpu_seconds"] == resources["cpu_seconds"]


def test_out_of_memory_in_training_becomes_one_line_naming_a_batch_that_fits(tmp_path, run_options, monkeypatch):
    from harness.core.defense import DEFENSES

    cls = DEFENSES.get("pgd-at")
    original = cls.train_step

    def tight_memory(self, model, optimizer, batch):
        if len(batch.y) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, model, optimizer, batch)

    monkeypatch.setattr(cls, "train_step", tight_memory)
    with pytest.raises(HarnessError) as err:
        run(make_spec("pgd-at", "synthetic", "smoke"), run_options(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "64 examples per device" in message and "a batch of 16 fits" in message
    assert "--nproc-per-node 4" in message and "global batch of 64" in message
