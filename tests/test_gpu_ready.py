"""GPU-ready training loop, checked on the CPU: no host read per step, resources recorded, OOM in one line."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from harness.core.errors import HarnessError
from harness.training.runner import Run, RunOptions, make_spec, run

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


def test_a_training_pass_reads_the_device_once_per_statistic_not_per_step(tmp_path, data_dir, monkeypatch):
    counts = []
    original = Run._train_pass

    def counted(self, *args, **kwargs):
        with HostReads() as mode:
            entry = original(self, *args, **kwargs)
        counts.append((mode.count, entry["minibatches"], len(entry["train"])))
        return entry

    monkeypatch.setattr(Run, "_train_pass", counted)
    record = run(
        make_spec("pgd-at", "synthetic", "smoke"),
        RunOptions(results_dir=tmp_path, data_dir=data_dir, device=torch.device("cpu"), progress=False),
    )
    ((reads, batches, stats),) = counts
    assert batches == 4 and reads <= stats  # the epoch means, read once at the end of the pass
    resources = record["epochs"][0]["resources"]
    assert resources["peak_memory"]["kind"] == "resident" and resources["peak_memory"]["bytes"] > 2**20
    assert resources["cpu_seconds"] > 0 and resources["cpus"] >= 1 and "load_1min" in resources
    assert record["epochs"][0]["cpu_seconds"] == resources["cpu_seconds"]


def test_out_of_memory_in_training_becomes_one_line_naming_a_batch_that_fits(tmp_path, data_dir, monkeypatch):
    from harness.core.defense import DEFENSES

    cls = DEFENSES.get("pgd-at")
    original = cls.train_step

    def tight_memory(self, model, optimizer, batch):
        if len(batch.y) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, model, optimizer, batch)

    monkeypatch.setattr(cls, "train_step", tight_memory)
    with pytest.raises(HarnessError) as err:
        run(
            make_spec("pgd-at", "synthetic", "smoke"),
            RunOptions(results_dir=tmp_path, data_dir=data_dir, device=torch.device("cpu"), progress=False),
        )
    message = str(err.value)
    assert "\n" not in message and "64 examples per device" in message and "a batch of 16 fits" in message
    assert "--nproc-per-node 4" in message and "global batch of 64" in message
