"""One run on several processes (GPUs) with torch.distributed: `torchrun --nproc-per-node N -m harness run`.

How a distributed run stays the same algorithm as a single-process run with the same global batch:
- Data: every rank draws the same seeded permutation and augmentation (`TensorLoader.epoch`) and
  keeps a contiguous slice of each global batch (`shard`); `Batch.index` stays the example's
  position in the training subset, so per-example defense state is addressed as before.
- Gradients: each rank's *local mean* loss is weighted by its share of the global batch before
  backward (`harness.training.precision.LossScaling.share`, the hook every defense's backward goes through),
  and DistributedDataParallel sums (not averages) over ranks: the gradient of the global mean loss,
  also when the last batch does not split evenly and along global BatchNorm's cross-rank paths.
- Attacks never trigger the all-reduce: PGD freezes the parameters (input gradients only), so no
  parameter hook fires, and DDP is built with `forward_sync_buffers=False`, so forward passes run no
  collective unless BatchNorm is synchronised.
- BatchNorm (`--batchnorm`, recorded in the spec): `global` (default) normalises with the statistics
  of the whole global batch, in training and train-mode attacks alike (torch's SyncBatchNorm on
  GPUs; `GlobalBatchNorm`, the same arithmetic over a differentiable all-reduce, on the CPU, where
  SyncBatchNorm does not run); `per-rank` keeps each rank's own statistics (a different algorithm:
  BatchNorm over B / N examples; running statistics are averaged across ranks after every pass).
  With global BatchNorm every train-mode forward is a collective, so a defense's control flow must
  agree across ranks: `any_rank` turns a rank-local "any example left?" into a global one.
- Per-example state (MMA, IAAT): each rank writes the rows of its own examples; after every pass
  `merge_rows` gives every rank the whole table (each row from the rank that visited it).
- Randomness: each rank reseeds from (seed, pass, rank) at the start of every pass, so a resumed
  run replays the same noise; random starts differ between a distributed and a single-process run
  (each rank draws for its own examples), which is why the equality test switches them off.
- Files: rank 0 alone writes records and checkpoints, and evaluates; the others wait.
Defenses opt in with `Defense.distributed_ready`; the rest are refused with a one-line reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.core.datasets import Batch
from harness.core.errors import HarnessError

BATCHNORM_MODES = ("global", "per-rank")
TIMEOUT = dt.timedelta(minutes=60)  # rank 0 evaluates alone while the others wait


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world_from_env() -> World:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    try:
        return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except (KeyError, ValueError) as exc:
        raise HarnessError(f"torchrun environment is incomplete or malformed ({exc}); launch with torchrun") from None


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on the CPU); returns this rank's device."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise HarnessError(
                f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                f"use --nproc-per-node {torch.cuda.device_count()} at most"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT, rank=world.rank, world_size=world.size
        )
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_from_main(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (pickled): decisions that must not be taken per rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def refuse(message: str, world: World) -> None:
    """Stop every rank before any work: rank 0 raises the one-line HarnessError (the CLI prints it,
    exit 2); the others, which would print the same line again, exit 2 silently. Only for decisions
    every rank takes identically from the command line."""
    if world.is_main:
        raise HarnessError(message)
    raise SystemExit(2)


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """A statistic summed over the process group (not differentiable); `value` outside one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def check_agreement(value: Any, world: World, what: str) -> None:
    """Every rank computed `value` on its own (e.g. from a checkpoint it read): a one-line error on
    every rank, together, when they differ (a results directory that is not shared, say)."""
    if not world.distributed:
        return
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    if len(set(map(repr, values))) > 1:
        raise HarnessError(
            f"{what} differs between processes ({', '.join(map(repr, values))}); "
            f"every process must see the same --results directory"
        )


def describe(world: World, batchnorm: str, device: torch.device) -> dict[str, Any]:
    return {
        "world_size": world.size,
        "backend": dist.get_backend() if world.distributed else None,
        "batchnorm": batchnorm,
        "sharding": "contiguous slice of each seeded global batch",
        "gradient": "DDP sum of per-rank losses weighted by their share of the global batch",
        "writer": "rank 0",
        "device_type": device.type,
    }


# --------------------------------------------------------------------------- data


def check_batches(num_examples: int, batch_size: int, world: World) -> None:
    """Every rank needs at least one example of every global batch (an empty shard has no mean loss)."""
    last = num_examples % batch_size or batch_size
    if min(batch_size, last) < world.size:
        raise HarnessError(
            f"a batch of {min(batch_size, last)} examples (training set {num_examples}, batch "
            f"{batch_size}) cannot give each of {world.size} processes one; use fewer processes"
        )


def shard(batch: Batch, world: World) -> tuple[Batch, float]:
    """This rank's contiguous slice of a global batch, and its share of the global batch."""
    if not world.distributed:
        return batch, 1.0
    n = len(batch.y)
    lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
    return Batch(batch.x[lo:hi], batch.y[lo:hi], batch.index[lo:hi]), (hi - lo) / n


def pass_seed(seed: int, p: int, rank: int) -> int:
    """The torch seed of rank `rank` in pass `p`: a pure function, so resuming replays it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{p}/{rank}".encode()).digest()[:7], "big")


# --------------------------------------------------------------------------- model


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its adjoint: every rank's output depends on every rank's input, so the
    gradient of a rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(tensor)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the whole global batch: statistics summed over ranks by a differentiable
    all-reduce (two: mean, then centred second moment). SyncBatchNorm's arithmetic for the CPU,
    where SyncBatchNorm refuses to run; outside training or a process group it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # autocast: statistics in fp32
        dims = (0, 2, 3)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=xf.dtype, device=x.device)
        totals = sum_over_ranks(torch.cat([xf.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = xf - mean.view(1, -1, 1, 1)
        var = sum_over_ranks(centred.pow(2).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * n / (n - 1).clamp(min=1)).to(self.running_var.dtype), momentum)
        return out.to(x.dtype)


def global_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer synchronised over the process group; state-dict keys unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
            if not isinstance(module, nn.BatchNorm2d):
                raise HarnessError(
                    f"global BatchNorm on the CPU supports BatchNorm2d only, found {type(module).__name__}"
                )
            new = GlobalBatchNorm(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            # the same Parameter and buffer objects (as convert_sync_batchnorm): an optimiser built
            # before the conversion still steps them
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(new, name, getattr(module, name))
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


def sum_hook(state, bucket):  # unannotated: DDP checks annotations, and ours are strings
    """Sum, not mean, over ranks: each rank's loss is already weighted by its share of the global
    batch (`LossScaling.share`). (state: None, bucket: dist.GradBucket -> Future[Tensor])"""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
    )
    ddp.register_comm_hook(None, sum_hook)
    return ddp


def average_buffers(model: nn.Module, world: World) -> None:
    """Per-rank BatchNorm: every rank takes the mean of the ranks' running statistics."""
    if not world.distributed:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world.size)


# --------------------------------------------------------------------------- state and statistics


def any_rank(flags: torch.Tensor) -> bool:
    """`flags.any()` over every rank's flags: control flow that must agree across ranks."""
    found = flags.any()
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = found.to(torch.int32)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found)


def merge_rows(table: torch.Tensor, mine: torch.Tensor, world: World) -> None:
    """In place: row i of `table` becomes the row of the rank whose `mine[i]` is set (rank 0's where
    none is). Exact: every row is a sum of one value and zeros."""
    if not world.distributed:
        return
    visited = mine.to(torch.int32)
    dist.all_reduce(visited)
    keep = mine | ((visited == 0) & world.is_main)
    shape = (-1,) + (1,) * (table.dim() - 1)
    contribution = torch.where(keep.view(shape), table, torch.zeros_like(table))
    dist.all_reduce(contribution)
    table.copy_(contribution)


def reduce_sums(values: dict[str, torch.Tensor], count: int, world: World) -> tuple[dict[str, torch.Tensor], int]:
    """Sums and count over every rank (one all-reduce), for batch-weighted epoch means."""
    if not world.distributed or not values:
        return values, count
    keys = sorted(values)
    packed = torch.stack([values[k].float().reshape(()) for k in keys] + [values[keys[0]].new_tensor(float(count))])
    dist.all_reduce(packed)
    return {k: packed[i] for i, k in enumerate(keys)}, int(packed[-1])
