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

    return EvaluationStore.create(directory, {"checkpoint": {}, "dataset": "t", "model": "m", "n": n,
                                              "test_indices": f"0..{n - 1}", "config": {}, "environment": {}})
