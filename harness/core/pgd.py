"""The one PGD every defense and evaluation shares, and the context managers attacks run under.

Conventions: inputs live in [0, 1]; `eps` and `step_size` are a float or a per-sample tensor; the
attack takes gradients with respect to the input only (parameters are frozen while it runs, so
autograd skips every weight-gradient kernel: the 7.7x rather than 11x cost of an AT step); the
model's train/eval flags are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.scale.distributed import any_rank

BNMode = Literal["train", "eval"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample loss
# (logits at the current iterate, y) -> (B,) bool: which examples take this step (FAT's early stop)
StepFilter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcastable (B, 1, ..., 1) tensor from a scalar or a length-B vector."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.dim() - 1)))


@contextmanager
def model_mode(model: nn.Module, mode: BNMode) -> Iterator[None]:
    """Run with the whole model in train or eval mode, restoring every module's flag after."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Stop gradients to parameters so that backward computes input gradients only."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def project(x: torch.Tensor, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Project delta onto the L-inf ball of radius eps and the [0, 1] box around x."""
    delta = torch.max(torch.min(delta, eps), -eps)
    return (x + delta).clamp_(0, 1) - x


def uniform_start(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return project(x, (torch.rand_like(x) * 2 - 1) * eps, eps)


def input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = cross_entropy
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample loss, logits, d loss / d x) at x, parameters untouched."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, y)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


@dataclass(frozen=True)
class Ascent:
    """How the one PGD loop runs (see `pgd` for each field); `stop_when_fooled` is evaluation's mode."""

    steps: int
    step_size: float | torch.Tensor
    random_start: bool = True
    loss_fn: LossFn = cross_entropy
    mode: BNMode = "eval"
    delta_init: torch.Tensor | None = None
    first_grad: torch.Tensor | None = None
    keep_stepping: StepFilter | None = None
    step_noise: float = 0.0
    stop_when_fooled: bool = False


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int,
    step_size: float | torch.Tensor,
    random_start: bool = True,
    loss_fn: LossFn = cross_entropy,
    mode: BNMode = "eval",
    delta_init: torch.Tensor | None = None,
    first_grad: torch.Tensor | None = None,
    keep_stepping: StepFilter | None = None,
    step_noise: float = 0.0,
) -> torch.Tensor:
    """L-inf PGD (Madry et al. 2018, eq. 2.1): `steps` signed-gradient ascent steps on `loss_fn`.

    Args:
        x: (B, C, H, W) clean inputs in [0, 1].  y: (B,) labels.
        eps, step_size: scalar or (B,) per-sample budgets.
        mode: BatchNorm/dropout mode while attacking ('train' as in Rice et al.'s PGD-AT, 'eval' as in TRADES).
        delta_init: start here instead of a random or zero start (projected first).
        first_grad: the gradient at the starting point when the caller already has it (ADES shares its cue
            computation with PGD's first step); saves one forward/backward.
        keep_stepping: called before every step with the (detached) logits at the current iterate, the same
            forward pass the gradient comes from; examples it marks False keep their perturbation for this
            step. Stateful filters implement early stopping (FAT); the loop ends as soon as no example moves.
        step_noise: std of Gaussian noise added to every step before projection (FAT's omega).
    Returns: x_adv with ||x_adv - x||_inf <= eps (per sample) and x_adv in [0, 1], detached.
    """
    if first_grad is not None and keep_stepping is not None:
        raise ValueError("keep_stepping needs the logits of every step, so it cannot reuse first_grad")
    how = Ascent(steps, step_size, random_start, loss_fn, mode, delta_init, first_grad, keep_stepping, step_noise)
    x_adv, _ = _ascend(model, x, y, eps, how)
    return x_adv


def pgd_until_fooled(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int,
    step_size: float | torch.Tensor,
    random_start: bool = True,
    loss_fn: LossFn = cross_entropy,
    delta_init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same PGD for evaluation: a point leaves the batch at the first iterate that fools the model.

    Counting a point as broken when any iterate (the start, every step, the last) is misclassified
    is the standard and stronger count, and it makes dropping broken points exact: later steps run
    on the points still standing only. Eval mode (per-sample independence) is required.
    Returns: (x_adv, fooled): x_adv is the fooling iterate where one exists, else the last;
    fooled (B,) bool says which points some iterate fooled.
    """
    return _ascend(
        model, x, y, eps, Ascent(steps, step_size, random_start, loss_fn, "eval", delta_init, stop_when_fooled=True)
    )


def _start(x: torch.Tensor, eps_t: torch.Tensor, delta_init: torch.Tensor | None, random_start: bool) -> torch.Tensor:
    """The first perturbation: the one given (projected), PGD's uniform random start, or zero."""
    if delta_init is not None:
        return project(x, delta_init.detach(), eps_t)
    return uniform_start(x, eps_t) if random_start else torch.zeros_like(x)


def _move(
    grad: torch.Tensor, step_t: torch.Tensor, step_noise: float, moving: torch.Tensor | None, xs: torch.Tensor
) -> torch.Tensor:
    """A signed-gradient step, with optional Gaussian step noise, zero for points that stopped moving."""
    move = step_t * grad.sign()
    if step_noise:
        move = move + step_noise * torch.randn_like(xs)
    return move if moving is None else move * per_sample(moving, xs)


def _ascend(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, a: Ascent
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one PGD loop; with `a.stop_when_fooled` it also checks every iterate and shrinks the batch."""
    eps_t = per_sample(eps, x)
    step_t = per_sample(a.step_size, x)
    x = x.detach()
    delta = _start(x, eps_t, a.delta_init, a.random_start)
    live = torch.arange(len(x), device=x.device) if a.stop_when_fooled else None
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device) if a.stop_when_fooled else None
    final_delta = delta.clone() if a.stop_when_fooled else None
    xs, ys = x, y  # the points still attacked (all of them unless a.stop_when_fooled)
    with model_mode(model, a.mode), frozen_parameters(model), torch.enable_grad():
        for step in range(a.steps + int(a.stop_when_fooled)):  # a.stop_when_fooled: one more forward, no step
            moving = None
            if step == 0 and a.first_grad is not None:
                grad = a.first_grad
            else:
                attacked = delta.requires_grad_(True)
                logits = model(xs + attacked)
                keep = None
                if a.stop_when_fooled:
                    hit = logits.detach().argmax(1) != ys
                    if bool(hit.any()):  # record the fooling iterates; continue with the others
                        fooled[live[hit]] = True
                        final_delta[live[hit]] = attacked.detach()[hit]
                        keep = (~hit).nonzero().squeeze(1)
                        live, xs, ys, logits, eps_t, step_t = (t[keep] for t in (live, xs, ys, logits, eps_t, step_t))
                        delta = attacked.detach()[keep]
                    if step == a.steps or len(live) == 0:
                        break
                if a.keep_stepping is not None:
                    moving = a.keep_stepping(logits.detach(), ys)
                    if not any_rank(moving):  # global: under torchrun a train-a.mode forward is a collective
                        break
                (grad,) = torch.autograd.grad(a.loss_fn(logits, ys).sum(), attacked)
                if keep is not None:
                    grad = grad[keep]
            delta = project(xs, delta.detach() + _move(grad, step_t, a.step_noise, moving, xs), eps_t)
    if not a.stop_when_fooled:
        return (x + delta).detach(), None
    final_delta[live] = delta.detach()
    return (x + final_delta).detach(), fooled
