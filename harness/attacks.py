"""The one PGD every defense and evaluation shares, and the context managers attacks run under.

Conventions: inputs live in [0, 1]; `eps` and `step_size` are a float or a per-sample tensor; the
attack takes gradients with respect to the input only (parameters are frozen while it runs, so
autograd skips every weight-gradient kernel: the 7.7x rather than 11x cost of an AT step); the
model's train/eval flags are restored afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.registry import Registry

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


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: LossFn = cross_entropy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample loss, logits, d loss / d x) at x, parameters untouched."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, y)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, *,
        steps: int, step_size: float | torch.Tensor, random_start: bool = True,
        loss_fn: LossFn = cross_entropy, mode: BNMode = "eval",
        delta_init: torch.Tensor | None = None, first_grad: torch.Tensor | None = None,
        keep_stepping: StepFilter | None = None, step_noise: float = 0.0) -> torch.Tensor:
    """L-inf PGD (Madry et al. 2018, eq. 2.1): `steps` signed-gradient ascent steps on `loss_fn`.

    Args:
        x: (B, C, H, W) clean inputs in [0, 1].  y: (B,) labels.
        eps, step_size: scalar or (B,) per-sample budgets.
        mode: BatchNorm/dropout mode while attacking ('train' as in Rice et al.'s PGD-AT,
            'eval' as in TRADES and most evaluation code).
        delta_init: start here instead of a random or zero start (projected first).
        first_grad: the gradient at the starting point when the caller already has it (ADES
            shares its cue computation with PGD's first step); saves one forward/backward.
        keep_stepping: called before every step with the (detached) logits at the current iterate,
            the same forward pass the gradient comes from; examples it marks False keep their
            perturbation for this step. Stateful filters implement early stopping (FAT); the
            loop ends as soon as no example moves.
        step_noise: std of Gaussian noise added to every step before projection (FAT's omega).
    Returns: x_adv with ||x_adv - x||_inf <= eps (per sample) and x_adv in [0, 1], detached.
    """
    if first_grad is not None and keep_stepping is not None:
        raise ValueError("keep_stepping needs the logits of every step, so it cannot reuse first_grad")
    eps_t = per_sample(eps, x)
    step_t = per_sample(step_size, x)
    x = x.detach()
    if delta_init is not None:
        delta = project(x, delta_init.detach(), eps_t)
    elif random_start:
        delta = uniform_start(x, eps_t)
    else:
        delta = torch.zeros_like(x)
    with model_mode(model, mode), frozen_parameters(model):
        for step in range(steps):
            moving = None
            if step == 0 and first_grad is not None:
                grad = first_grad
            else:
                delta.requires_grad_(True)
                logits = model(x + delta)
                if keep_stepping is not None:
                    moving = keep_stepping(logits.detach(), y)
                    if not moving.any():
                        break
                (grad,) = torch.autograd.grad(loss_fn(logits, y).sum(), delta)
            move = step_t * grad.sign()
            if step_noise:
                move = move + step_noise * torch.randn_like(x)
            if moving is not None:
                move = move * per_sample(moving, x)
            delta = project(x, delta.detach() + move, eps_t)
    return (x + delta).detach()


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class AttackInfo:
    """An evaluation attack: `run(model, x, y, eps, step_size) -> x_adv` (eps scalar or per sample)."""

    name: str
    description: str
    run: Callable[..., torch.Tensor]


ATTACKS: Registry[AttackInfo] = Registry("attack")


def register_attack(name: str, description: str):
    def decorate(fn):
        ATTACKS.add(name, AttackInfo(name, description, fn))
        return fn

    return decorate


@register_attack("pgd-20", "PGD-20 on cross-entropy, uniform random start, eval mode (step: the data set's)")
def pgd20(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, step_size) -> torch.Tensor:
    return pgd(model, x, y, eps, steps=20, step_size=step_size, mode="eval")
