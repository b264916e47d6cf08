"""A tiny classifier trained in seconds on a learnable synthetic problem, for the evaluation tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def template_data(n: int, seed: int, size: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Class templates plus noise, in [0, 1]: separable, but not robust at large eps."""
    gen = torch.Generator().manual_seed(1234)
    templates = torch.rand(classes, 1, size, size, generator=gen)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = (0.5 + 0.35 * (templates[y] - 0.5) + 0.08 * torch.randn(n, 1, size, size, generator=gen)).clamp(0, 1)
    return x, y


def tiny_model(seed: int = 0, size: int = 8, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 64), nn.ReLU(), nn.Linear(64, classes))


def train_tiny(steps: int = 300, seed: int = 0) -> nn.Module:
    model = tiny_model(seed)
    x, y = template_data(2000, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class ScaledLogits(nn.Module):
    """logits x 1e4: the softmax saturates, cross-entropy gradients underflow to exactly zero (masking)."""

    def __init__(self, inner: nn.Module, scale: float = 1e4):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


class Shattered(nn.Module):
    """f(x + 0.004 sin(2000 x)): almost the same function, gradients dominated by a fast oscillation."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.004 * torch.sin(2000 * x))


def store_for(directory, n: int):
    from harness.evaluation.flags import EvaluationStore

    return EvaluationStore.create(
        directory,
        {
            "checkpoint": {},
            "dataset": "t",
            "model": "m",
            "n": n,
            "test_indices": f"0..{n - 1}",
            "config": {},
            "environment": {},
        },
    )


def train_tiny_at(steps: int = 300, seed: int = 0, eps: float = 0.06) -> nn.Module:
    """The tiny classifier adversarially trained (PGD-5 at eps): an honest model with some robustness,
    on which a PGD with enough steps and restarts converges."""
    from harness.core.pgd import pgd

    model = tiny_model(seed)
    x, y = template_data(2000, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        x_adv = pgd(model, x[idx], y[idx], eps, steps=5, step_size=eps / 3)
        loss = F.cross_entropy(model(x_adv), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def on_grid(x: torch.Tensor, grid: int = 255) -> torch.Tensor:
    """x rounded to multiples of 1/grid, as 8-bit images are."""
    return torch.round(x * grid) / grid


class _LyingBackward(torch.autograd.Function):
    """Identity forward; the backward pass replaces the gradient (negated, noise or zero)."""

    @staticmethod
    def forward(ctx, x, kind: str):
        ctx.kind = kind
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.kind == "negated":
            return -grad, None
        if ctx.kind == "noise":
            return torch.randn_like(grad) * grad.abs().mean(), None
        return torch.zeros_like(grad), None


class LyingBackward(nn.Module):
    """inner(x) whose input gradient lies: `kind` negated (the gradient points away from the boundary),
    noise (as large as the true one, no direction) or zero. The forward pass is the honest model's."""

    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        logits = self.inner(x)
        return _LyingBackward.apply(logits, self.kind)


class _StraightThrough(torch.autograd.Function):
    """Round to `levels` levels forward; backward the identity plus noise (BPDA with jitter)."""

    @staticmethod
    def forward(ctx, x, levels: int, jitter: float):
        ctx.jitter = jitter
        return torch.round(x * (levels - 1)) / (levels - 1)

    @staticmethod
    def backward(ctx, grad):
        return grad + ctx.jitter * grad.abs().mean() * torch.randn_like(grad), None, None


class Quantised(nn.Module):
    """inner(round(x * (levels-1)) / (levels-1)): input quantisation. jitter None: plain rounding
    (zero gradient almost everywhere); a number: straight-through gradient with that much noise."""

    def __init__(self, inner: nn.Module, levels: int = 8, jitter: float | None = None):
        super().__init__()
        self.inner, self.levels, self.jitter = inner, levels, jitter

    def forward(self, x):
        if self.jitter is None:
            return self.inner(torch.round(x * (self.levels - 1)) / (self.levels - 1))
        return self.inner(_StraightThrough.apply(x, self.levels, self.jitter))


class Randomised(nn.Module):
    """inner(x + sigma * noise): a randomised defense (every call draws new noise)."""

    def __init__(self, inner: nn.Module, sigma: float = 0.05):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


class OffGridMasked(nn.Module):
    """An off-grid detector: on the 1/255 grid (clean 8-bit images, and Square's queries at an eps on
    that grid) it answers by memory, the label of the nearest stored point with a large bonus, so
    nothing on the grid is ever broken; off the grid (PGD's random start and steps) it is the honest
    model with a negated input gradient. PGD is misled, a Square on the grid sees only the memory."""

    def __init__(self, inner: nn.Module, memory_x: torch.Tensor, memory_y: torch.Tensor, grid: int = 255):
        super().__init__()
        self.inner, self.grid = LyingBackward(inner, "negated"), grid
        self.register_buffer("memory_x", memory_x.flatten(1))
        self.register_buffer("memory_y", memory_y)

    def forward(self, x):
        logits = self.inner(x)
        flat = x.flatten(1)
        grid_points = ((flat * self.grid - torch.round(flat * self.grid)).abs() < 1e-3).all(1)
        nearest = torch.cdist(flat.detach(), self.memory_x, p=float("inf")).argmin(1)
        bonus = 30.0 * F.one_hot(self.memory_y[nearest], logits.shape[1]).to(logits.dtype)
        return logits + bonus * grid_points[:, None].to(logits.dtype)


class ConstantWhereWrong(nn.Module):
    """The honest model, but constant (gradient exactly zero) wherever it misclassifies (the label of
    the nearest stored point): a small CNN's dead-ReLU region, harmless to robust accuracy."""

    def __init__(self, inner: nn.Module, memory_x: torch.Tensor, memory_y: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("memory_x", memory_x.flatten(1))
        self.register_buffer("memory_y", memory_y)

    def forward(self, x):
        logits = self.inner(x)
        nearest = torch.cdist(x.flatten(1).detach(), self.memory_x, p=float("inf")).argmin(1)
        wrong = logits.detach().argmax(1) != self.memory_y[nearest]
        return torch.where(wrong[:, None], logits.detach(), logits)
