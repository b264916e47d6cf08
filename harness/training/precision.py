"""Training numerics: autocast precision, fp16 loss scaling, and torch.compile of the model.

Why one module: a defense calls backward and the optimiser step itself (Free-AT replays a minibatch,
ADES steps two optimisers), so fp16's GradScaler cannot live in the runner. Defenses call
`backward(loss)` and `step(*optimizers)` (or `harness.core.defense.sgd_step`, which does both); the runner
activates a `LossScaling` for the run with `scaling(...)`. Without an active one they are plain
`loss.backward()` and `optimizer.step()`, so tests and benchmarks that call a defense directly
behave as before.

Precision covers training and the training attack (both run under `torch.autocast`); evaluation
(validation and test accuracy) stays fp32: the runner evaluates outside autocast on the uncompiled
model, and the record says `eval_precision: fp32`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch
from torch import nn

from harness.core.errors import HarnessError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise HarnessError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast region of training steps (a no-op for fp32)."""
    if check_precision(precision) == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def full_precision(device: torch.device) -> AbstractContextManager:
    """An fp32 region inside training's autocast, for small computations whose fp16 form overflows:
    ADES's eps map and its mean-holding renormalisation divide by score spreads of ~1e-3, whose
    gradient (~1/spread^2) exceeds fp16's 65504 on every step (issue 22: the loss scale halved
    each step to ~5e-32 and phi never stepped)."""
    return torch.autocast(device_type=device.type, enabled=False)


def native_support(precision: str, device: torch.device) -> bool:
    """Whether `device` has native kernels for the precision's dtype (else autocast emulates it,
    slower than fp32). CUDA: bf16 needs compute capability 8.0 (torch.cuda.is_bf16_supported), fp16 is
    native. CPU: bf16 needs AVX512-BF16 or AMX; fp16 needs AMX-FP16: with only AVX512-FP16, torch's
    convolution weight gradient in fp16 takes a reference path ~100x slower than bf16's (measured on
    a Sapphire Rapids core, torch 2.14)."""
    if check_precision(precision) == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # other backends: no capability API to ask; assume native
    if precision == "bf16":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def slow_precision_warning(precision: str, device: torch.device) -> str | None:
    """The one-line warning for a dtype the device emulates; None when it is native."""
    if native_support(precision, device):
        return None
    return (
        f"warning: this {device.type} has no native {precision} kernels (torch's capability check); "
        f"{precision} training will be emulated and slower than fp32"
    )


class LossScaling:
    """fp16's dynamic loss scale (torch.amp.GradScaler); a pass-through for fp32 and bf16.

    `step` unscales, skips the update when a gradient overflowed, and adapts the scale once per
    call, so a defense that steps two optimisers on one loss passes both in one call.
    """

    def __init__(self, precision: str, device: torch.device):
        self.enabled = check_precision(precision) == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)
        self.device = device
        # This process's share of the global batch (`harness.scale.distributed`): its mean loss is weighted
        # by it before backward, so gradients summed over ranks are those of the global mean loss,
        # also along global BatchNorm's cross-rank paths. 1 in a single process (an exact no-op).
        self.share = 1.0

    def backward(self, loss: torch.Tensor) -> None:
        if self.share != 1.0:
            loss = loss * self.share
        with torch.autocast(device_type=self.device.type, enabled=False):  # backward outside autocast
            self.scaler.scale(loss).backward()

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)

    @property
    def scale(self) -> float | None:
        """The current loss scale (fp16 only; reads the device: call once per epoch, not per step)."""
        return float(self.scaler.get_scale()) if self.enabled else None


_ACTIVE: ContextVar[LossScaling | None] = ContextVar("harness_loss_scaling", default=None)


@contextmanager
def scaling(active: LossScaling) -> Iterator[LossScaling]:
    """Route every defense's `backward`/`step` through `active` for the duration."""
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)


def backward(loss: torch.Tensor) -> None:
    """`loss.backward()`, scaled when the run trains in fp16."""
    active = _ACTIVE.get()
    if active is None:
        loss.backward()
    else:
        active.backward(loss)


def step(*optimizers: torch.optim.Optimizer) -> None:
    """`optimizer.step()` for each, unscaled and overflow-checked when the run trains in fp16."""
    active = _ACTIVE.get()
    if active is None:
        for optimizer in optimizers:
            optimizer.step()
    else:
        active.step(*optimizers)


def compile_backend() -> str:
    """torch.compile's backend: inductor (the default), or $HARNESS_COMPILE_BACKEND (CI uses aot_eager:
    the same graph capture and autograd tracing without minutes of C++ compilation on 2 cores)."""
    return os.environ.get("HARNESS_COMPILE_BACKEND", "inductor")


def compiled(model: nn.Module, backend: str) -> nn.Module:
    """`torch.compile(model, backend=backend)`, or `model` for backend "none" (`RunSpec.compile`). The
    caller keeps the original module for state dicts (a compiled module's keys carry an `_orig_mod.`
    prefix) and for fp32 evaluation."""
    if backend == "none":
        return model
    return torch.compile(model, backend=backend)
