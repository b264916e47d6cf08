"""Per-sample difficulty cues for epsilon scheduling (ADES, Static-DES), and their batch normalisation.

The paper (ADES, section 3) names three cues per training example: the norm of the input gradient
of the cross-entropy, the softmax entropy, and the model's uncertainty over Monte-Carlo-dropout
passes. Its formulas were lost; every reading made here is a named choice:

- `grad_norm`: ||d CE / d x_i||, L2 (the natural reading) or L1 (the dual of the L-inf threat model).
  Under train-mode BatchNorm the batch statistics couple the examples, so the gradient is
  d(sum_j CE_j) / d x_i, not example i's own (measured up to ~3000x off for confident examples);
  `clean_pass(..., mode="eval")` gives each example's own gradient (ADES's `cue_bn=eval`).
- `entropy`: -sum_c p_c log p_c of the softmax at the clean input.
- `mc_variance`: mean over classes of the per-class variance (population, over the T passes) of the
  softmax. Mode `head` resamples dropout on the penultimate features and runs only the linear head
  T times (the network every other method trains, nearly free); mode `full` runs T full forward
  passes of a model built with dropout, BatchNorm in eval mode (the usual MC-dropout practice, and
  running statistics stay untouched).

All cues are computed on the clean input, by one forward/backward with dropout off (the network the
cue describes, not one random thinned copy of it), whose gradient PGD may reuse as its first step
(see `clean_pass`). Each cue is min-max normalised over the batch; a cue that is constant over the
batch up to a relative tolerance (or a batch of one) carries no ranking information and maps to
`constant_value` (0.5 by default: the middle of the scale), never to NaN or to rounding noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.errors import HarnessError
from harness.core.pgd import BNMode, cross_entropy, frozen_parameters, model_mode

CUE_NAMES = ("grad_norm", "entropy", "mc_variance")
GradNorm = Literal["l2", "l1"]
MCMode = Literal["head", "full"]


class CleanPass(NamedTuple):
    """One forward/backward at the clean input (parameters frozen), everything detached."""

    loss: torch.Tensor  # (B,) per-sample cross-entropy
    logits: torch.Tensor  # (B, K)
    grad: torch.Tensor  # (B, C, H, W) d CE_i / d x_i
    features: torch.Tensor | None  # (B, D) penultimate features, when the model exposes them


def has_head(model: nn.Module) -> bool:
    """True for models split as `classifier(embed(x))` (every `harness.core.models.Classifier`)."""
    return callable(getattr(model, "embed", None)) and isinstance(getattr(model, "classifier", None), nn.Module)


@contextmanager
def dropout_off(model: nn.Module, mode: BNMode) -> Iterator[None]:
    """BatchNorm in `mode`, every dropout layer off; flags restored afterwards."""
    with model_mode(model, mode):
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train(False)
        yield


def clean_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: BNMode) -> CleanPass:
    """Loss, logits, input gradient and penultimate features at x: BatchNorm in `mode`, dropout off.

    In the attack's BN mode the gradient is what PGD computes at x (for a model without dropout),
    so PGD can take it as its first gradient; in eval mode it is each example's own gradient.
    """
    with dropout_off(model, mode), frozen_parameters(model):
        x = x.detach().requires_grad_(True)
        if has_head(model):
            features = model.embed(x)
            logits = model.classifier(features)
        else:
            features, logits = None, model(x)
        loss = cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return CleanPass(loss.detach(), logits.detach(), grad, None if features is None else features.detach())


def grad_norm(grad: torch.Tensor, norm: GradNorm = "l2") -> torch.Tensor:
    """(B,) per-sample L2 or L1 norm of the input gradient."""
    return torch.linalg.vector_norm(grad.flatten(1), ord=2 if norm == "l2" else 1, dim=1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) softmax entropy in nats, stable for confident predictions."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def softmax_variance(probs: torch.Tensor) -> torch.Tensor:
    """(T, B, K) softmax samples -> (B,) mean over classes of the population variance over T."""
    return probs.var(dim=0, correction=0).mean(1)


@torch.no_grad()
def mc_variance_head(model: nn.Module, features: torch.Tensor, samples: int, p: float) -> torch.Tensor:
    """T dropout masks on the penultimate features, through the linear head only (one batched call)."""
    b = features.shape[0]
    stacked = features.unsqueeze(0).expand(samples, *features.shape).reshape(samples * b, -1)
    logits = model.classifier(F.dropout(stacked, p=p, training=True))
    return softmax_variance(logits.float().softmax(1).view(samples, b, -1))


@contextmanager
def dropout_only(model: nn.Module) -> Iterator[None]:
    """Eval mode except dropout layers: MC dropout without touching BatchNorm running statistics."""
    with model_mode(model, "eval"):
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train(True)
        yield


def has_dropout(model: nn.Module) -> bool:
    """Whether the model was built with dropout (`harness.core.models.Classifier.dropout` > 0)."""
    rate = getattr(model, "dropout", None)
    if isinstance(rate, (int, float)):
        return rate > 0
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


@torch.no_grad()
def mc_variance_full(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """T full stochastic forward passes (dropout active everywhere, BatchNorm in eval mode)."""
    with dropout_only(model):
        probs = torch.stack([model(x).float().softmax(1) for _ in range(samples)])
    return softmax_variance(probs)


def minmax(cue: torch.Tensor, constant_value: float = 0.5, rtol: float = 1e-5, tiny: float = 1e-12) -> torch.Tensor:
    """Batch min-max normalisation to [0, 1]; a cue whose span is below `rtol` x its magnitude (or
    `tiny`), or a batch of one, -> `constant_value`: float32 rounding noise is not a ranking."""
    cue = cue.detach().float()
    lo, hi = cue.min(), cue.max()
    span = hi - lo
    varies = span > torch.maximum(rtol * torch.maximum(lo.abs(), hi.abs()), torch.tensor(tiny))
    scaled = (cue - lo) / span.clamp_min(tiny)
    return torch.where(varies, scaled, torch.full_like(cue, constant_value)).clamp_(0, 1)


def compute_cues(
    model: nn.Module,
    x: torch.Tensor,
    clean: CleanPass,
    names: tuple[str, ...],
    *,
    norm: GradNorm,
    mc_mode: MCMode,
    mc_samples: int,
    mc_head_dropout: float,
) -> dict[str, torch.Tensor]:
    """Raw (un-normalised) cues, each (B,), for the cue names asked for, in that order."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "grad_norm":
            out[name] = grad_norm(clean.grad, norm)
        elif name == "entropy":
            out[name] = entropy(clean.logits)
        elif mc_mode == "head":
            if clean.features is None:
                raise HarnessError(
                    "MC-dropout `head` mode needs a model split as classifier(embed(x)); "
                    "use a harness model or --set mc_mode=full"
                )
            out[name] = mc_variance_head(model, clean.features, mc_samples, mc_head_dropout)
        else:
            out[name] = mc_variance_full(model, x, mc_samples)
    return out


def normalised(cues: dict[str, torch.Tensor], constant_value: float = 0.5) -> torch.Tensor:
    """(B, k) matrix of batch-normalised cues, columns in the order of `cues`."""
    return torch.stack([minmax(c, constant_value) for c in cues.values()], dim=1)
