"""How the runner's model is executed: precision, compile, and data parallelism, in one object.

The runner keeps the algorithm (passes, checkpoints, evaluation); `Execution` keeps the machinery
that must not change it: the plain model for state dicts and fp32 evaluation, the model the
defense trains (compiled and/or wrapped in DistributedDataParallel), the autocast region and fp16
loss scaling of training steps, and each rank's shard of a global batch. Its `describe()` goes into
the run record as `execution`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.core.datasets import Batch
from harness.core.defense import Defense
from harness.core.errors import HarnessError
from harness.scale import distributed
from harness.scale.distributed import World
from harness.training import precision
from harness.training.resources import largest_fitting_batch, out_of_memory_message


@dataclass
class Execution:
    net: nn.Module  # the plain model: state dicts and evaluation
    train_model: nn.Module  # what the defense trains: compiled and/or DDP-wrapped `net`
    precision: str
    compile: str  # RunSpec.compile: a torch.compile backend or "none"
    world: World
    device: torch.device
    scaler: precision.LossScaling

    @classmethod
    def prepare(
        cls, net: nn.Module, precision_name: str, compile_backend: str, world: World, device: torch.device
    ) -> Execution:
        """`net` must already be on `device` with global BatchNorm where the spec asks for it."""
        train_model = precision.compiled(net, compile_backend)
        if world.distributed:
            train_model = distributed.data_parallel(train_model, device)
        return cls(
            net,
            train_model,
            precision_name,
            compile_backend,
            world,
            device,
            precision.LossScaling(precision_name, device),
        )

    @staticmethod
    def check_defense(defense: Defense, world: World) -> None:
        """The runner's guard (check_distributable refuses the command before any work)."""
        if world.distributed and not defense.distributed_ready:
            raise HarnessError(
                f"{defense.name} is not checked for training on several processes (its state or "
                f"batch-level statistics are per process); run it without torchrun"
            )

    @contextmanager
    def training_steps(self) -> Iterator[None]:
        """Autocast and loss scaling for ONE defense step, attack included. Never wrap several
        optimiser steps in one region: autocast caches the low-precision copy of every weight that
        requires grad until the outermost region exits, so later steps would run forward with the
        first step's weights (the bf16/fp16 constant predictor of issue 22)."""
        with ExitStack() as stack:
            stack.enter_context(precision.autocast(self.precision, self.device))
            stack.enter_context(precision.scaling(self.scaler))
            yield

    def train_step(self, defense: Defense, optimizer: torch.optim.Optimizer, batch: Batch) -> dict[str, torch.Tensor]:
        """One minibatch of `defense` on the training model, in its own autocast region."""
        with self.training_steps():
            return defense.train_step(self.train_model, optimizer, batch)

    def shard(self, batch: Batch) -> Batch:
        local, self.scaler.share = distributed.shard(batch, self.world)
        return local

    def end_pass(self, defense: Defense, visited: torch.Tensor | None, batchnorm: str) -> None:
        """Make every rank's defense state and BatchNorm statistics whole again."""
        if not self.world.distributed:
            return
        for table in defense.per_example_state():
            distributed.merge_rows(table, visited, self.world)
        if batchnorm != "global":
            distributed.average_buffers(self.net, self.world)

    def out_of_memory(
        self, defense: Defense, optimizer: torch.optim.Optimizer, batch: Batch, global_batch: int
    ) -> HarnessError:
        """The one-line error for an OOM in a training step; single-process runs measure what fits
        (with the run's own defense, model and precision: the run is abandoned anyway)."""
        fits = None
        if not self.world.distributed:

            def try_step(n: int) -> None:
                self.train_step(defense, optimizer, Batch(batch.x[:n], batch.y[:n], batch.index[:n]))

            fits = largest_fitting_batch(try_step, len(batch.y))
        return HarnessError(out_of_memory_message(self.device, len(batch.y), global_batch, fits))

    def describe(self, batchnorm: str) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "eval_precision": "fp32",
            "compile": self.compile if self.compile != "none" else False,
            "native_precision": precision.native_support(self.precision, self.device),
            "loss_scaling": "dynamic (GradScaler)" if self.scaler.enabled else None,
            "distributed": distributed.describe(self.world, batchnorm, self.device),
        }


def check_distributable(specs: list, world: World) -> None:
    """Under torchrun, before any work: every defense of the command must be distributed-ready.
    One line from rank 0, exit 2 on every rank (docs/distributed.md says why each is refused)."""
    from harness.core.defense import DEFENSES

    if not world.distributed:
        return
    refused = sorted({spec.defense for spec in specs if not DEFENSES.get(spec.defense).distributed_ready})
    if refused:
        distributed.refuse(
            f"{', '.join(refused)} cannot train on several processes (per-process state or batch "
            f"statistics, see docs/distributed.md); run {'it' if len(refused) == 1 else 'them'} "
            f"without torchrun",
            world,
        )
