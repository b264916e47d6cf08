"""Evaluation attacks with one call: `robust(model, x, y, eps, candidates) -> AttackOutcome`.

x in [0, 1]; eps a scalar (a Fraction in sweeps) or, for the PGD family, a per-sample tensor;
`candidates` are the points still to attack (the clean-correct ones: a misclassified clean point
counts as broken, since x itself lies in the ball). The caller (`sweep`) puts the model in eval mode
and freezes its parameters, and restores both afterwards; the attacks here take gradients with
respect to the input only.

- PGD-k on cross-entropy (docs/recipes.md "Evaluation conventions"): uniform random start, restarts
  only on the points still standing, a point broken when ANY iterate fools it (`pgd_until_fooled`).
  Step 2/255 at eps 8/255 is written `eps/4` so sweeps and Fashion-MNIST (0.1 -> 1/40) scale; an
  absolute step such as the TRADES scripts' 0.003 can be given instead and is recorded as given.
- CW-inf: the same PGD on the CW margin loss -clamp(z_y - max_{j!=y} z_j + kappa, min=0),
  kappa 50, 30 steps (the FAT/CAT/Madry convention; not torchattacks' L2 `CW`).
- AutoAttack (Croce & Hein 2020) through the `pyautoattack` package: versions standard / plus /
  rand, a custom attack list, Square alone; AutoAttack's own state file makes long runs resumable.
- `QuickSquare`: Square (Andriushchenko et al. 2020) with a small query budget and the query schedule
  rescaled to it, the cheap black-box second opinion of the masking probes.
"""

from __future__ import annotations

import abc
import ast
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import fraction_str, parse_eps
from harness.core.errors import HarnessError
from harness.core.pgd import LossFn, cross_entropy, per_sample, pgd_until_fooled
from harness.core.registry import Registry

AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AutoAttackVersion = Literal["standard", "plus", "rand", "custom"]


@dataclass(frozen=True)
class AttackOptions:
    """The knobs `harness eval` exposes; each attack reads those it needs and records them."""

    pgd_restarts: int = 1
    pgd_step: str = "eps/4"  # relative 'eps/K', or absolute like '2/255' or '0.003' (TRADES scripts)
    seed: int = 0
    batch_size: int = 500
    autoattack_attacks: tuple[str, ...] = ("apgd-ce", "apgd-t")  # the list of `autoattack-custom`
    state_dir: Path | None = None  # where AutoAttack keeps its resumable state files

    def __post_init__(self):
        if self.pgd_restarts < 1:
            raise HarnessError(f"--pgd-restarts must be at least 1, got {self.pgd_restarts}")
        if self.batch_size < 1:
            raise HarnessError(f"--batch-size must be at least 1, got {self.batch_size}")
        step_size(self.pgd_step, torch.ones(1))  # validate now, not after the first cell
        unknown = [a for a in self.autoattack_attacks if a not in AUTOATTACK_ATTACKS]
        if unknown or not self.autoattack_attacks:
            raise HarnessError(
                f"--autoattack-attacks: unknown {', '.join(unknown) or '(empty list)'}; "
                f"choose from {', '.join(AUTOATTACK_ATTACKS)}"
            )


def step_size(spec: str, eps: torch.Tensor) -> torch.Tensor:
    """'eps/4' -> eps / 4 (per sample); '2/255' or '0.003' -> that absolute step."""
    match = re.fullmatch(r"\s*eps\s*/\s*([0-9.]+)\s*", spec)
    if match:
        divisor = float(match.group(1))
        if divisor <= 0:
            raise HarnessError(f"--pgd-step {spec!r}: the divisor must be positive")
        return eps / divisor
    try:
        value = parse_eps(spec)
    except HarnessError:
        raise HarnessError(
            f"--pgd-step {spec!r}: give eps/K (e.g. eps/4) or an absolute step such as 2/255 or 0.003"
        ) from None
    if value == 0:
        raise HarnessError("--pgd-step must be positive")
    return torch.full_like(eps, float(value))


@dataclass(frozen=True)
class AttackOutcome:
    x_adv: torch.Tensor  # (N, C, H, W): a fooling point where the attack found one
    robust: torch.Tensor  # (N,) bool: a candidate that no attempt fooled
    warnings: tuple[str, ...] = ()  # what the attack itself reported (AutoAttack's checks)
    # (N,) bool: broken before an interruption, whose adversarial example was not kept (resumed AutoAttack)
    unverifiable: torch.Tensor | None = None


def predict_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) bool: model(x) == y, in batches (the clean pass; no attack step can change anything at eps 0)."""
    with torch.no_grad():
        return torch.cat([model(xb).argmax(1) == yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])


class EvalAttack(abc.ABC):
    name: str

    @abc.abstractmethod
    def robust(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: Fraction | float | torch.Tensor,
        candidates: torch.Tensor,
    ) -> AttackOutcome:
        """Attack the candidates (model already in eval mode, parameters frozen)."""

    @abc.abstractmethod
    def config(self) -> dict:
        """Every setting that changes the result, for the evaluation record."""


def eps_tensor(eps: Fraction | float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) float budget from a scalar, Fraction or per-sample tensor."""
    value = eps if isinstance(eps, torch.Tensor) else torch.tensor(float(eps))
    return per_sample(value.to(x.device, x.dtype), x).flatten()


# --------------------------------------------------------------------------- PGD family


def cw_margin_loss(kappa: float) -> LossFn:
    """CW margin loss to maximise: -clamp(z_y - max_{j != y} z_j + kappa, min=0) per sample."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        return -(true - others.max(1).values + kappa).clamp(min=0)

    return loss


@dataclass(frozen=True)
class PGDAttack(EvalAttack):
    name: str
    steps: int
    loss: Literal["ce", "cw"]
    restarts: int
    step: str
    seed: int
    batch_size: int
    kappa: float = 50.0

    def config(self) -> dict:
        out = {
            "kind": "pgd",
            "loss": self.loss,
            "steps": self.steps,
            "step_size": self.step,
            "restarts": self.restarts,
            "random_start": "uniform",
            "bn": "eval",
            "seed": self.seed,
            "broken_when": "any iterate misclassified",
            "batch_size": self.batch_size,
        }
        if self.loss == "cw":
            out["kappa"] = self.kappa
        return out

    def loss_fn(self) -> LossFn:
        return cross_entropy if self.loss == "ce" else cw_margin_loss(self.kappa)

    def robust(self, model, x, y, eps, candidates) -> AttackOutcome:
        eps_t = eps_tensor(eps, x)
        steps_t = step_size(self.step, eps_t)
        robust = candidates.clone()
        x_adv = x.clone()
        with caller_rng_kept(x.device):
            torch.manual_seed(self.seed)
            for _ in range(self.restarts):
                # Drawn for every point, so a point's start does not depend on which others still stand
                # (and a single restart starts exactly where torchattacks' PGD with this seed does).
                noise = torch.rand_like(x) * 2 - 1

                def attack(chunk: torch.Tensor, noise: torch.Tensor = noise) -> None:  # this restart's start
                    e = eps_t[chunk]
                    adv, fooled = pgd_until_fooled(
                        model,
                        x[chunk],
                        y[chunk],
                        e,
                        steps=self.steps,
                        step_size=steps_t[chunk],
                        loss_fn=self.loss_fn(),
                        delta_init=noise[chunk] * e.view(-1, 1, 1, 1),
                    )
                    x_adv[chunk] = adv
                    robust[chunk[fooled]] = False

                in_batches_that_fit(robust.nonzero().squeeze(1), self.batch_size, attack)
        return AttackOutcome(x_adv, robust)


def caller_rng_kept(device: torch.device):
    """Attacks reseed torch's generators (pyautoattack's do it themselves): inside this, the caller's random
    state is saved and restored, so an evaluation never shifts the randomness of what runs after it."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def single_eps(name: str, eps: Fraction | float | torch.Tensor) -> float:
    if isinstance(eps, torch.Tensor) and eps.dim() > 0:
        raise HarnessError(f"{name} takes one eps for all points, not a per-sample tensor")
    return float(eps)


def perturb_candidates(
    perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    candidates: torch.Tensor,
    batch_size: int,
) -> AttackOutcome:
    """A pyautoattack attack's `perturb(x, y)` on the candidates only, in batches that fit; the caller's random
    state is kept."""
    robust, x_adv = candidates.clone(), x.clone()

    def attack(chunk: torch.Tensor) -> None:
        adv = perturb(x[chunk], y[chunk])
        x_adv[chunk] = adv
        robust[chunk] = predict_correct(model, adv, y[chunk], len(chunk))

    with caller_rng_kept(x.device):
        in_batches_that_fit(candidates.nonzero().squeeze(1), batch_size, attack)
    return AttackOutcome(x_adv, robust)


def in_batches_that_fit(indices: torch.Tensor, batch_size: int, run: Callable[[torch.Tensor], None]) -> None:
    """run(chunk) over `indices` in batches of `batch_size`, halving it whenever the GPU runs out of
    memory (per-point results do not depend on the batch in eval mode, so this changes only speed)."""
    start, size = 0, batch_size
    while start < len(indices):
        chunk = indices[start : start + size]
        try:
            run(chunk)
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            continue
        start += len(chunk)


# --------------------------------------------------------------------------- AutoAttack


@contextmanager
def collect_autoattack_warnings() -> Iterator[list[str]]:
    """AutoAttack reports its own checks (randomness, probabilities, Square beating the rest) as log
    warnings; collect them for the evaluation record instead of letting them interleave with output."""
    logger = logging.getLogger("auto-attack")
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    handler = Collect()
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved


@dataclass(frozen=True)
class AutoAttackEval(EvalAttack):
    name: str
    version: AutoAttackVersion
    seed: int
    batch_size: int
    attacks: tuple[str, ...] | None = None  # only for version 'custom'
    state_dir: Path | None = field(default=None, compare=False)

    def config(self) -> dict:
        return {
            "kind": "autoattack",
            "package": "pyautoattack",
            "version": self.version,
            "norm": "Linf",
            "attacks": list(self.attacks) if self.attacks else None,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def build(self, model: nn.Module, eps: float, device: torch.device):
        from pyautoattack import AutoAttack

        return AutoAttack(
            model,
            attacks=list(self.attacks) if self.version == "custom" else None,
            device=device,
            eps=eps,
            norm="Linf",
            seed=self.seed,
            version=self.version,
        )

    def state_path(self, eps: Fraction | float) -> Path | None:
        if self.state_dir is None:
            return None
        tag = fraction_str(Fraction(eps)).replace("/", "-") if isinstance(eps, Fraction) else f"{eps:g}"
        return Path(self.state_dir) / f"{self.name}@{tag}.state.json"

    def robust(self, model, x, y, eps, candidates) -> AttackOutcome:
        if isinstance(eps, torch.Tensor) and eps.dim() > 0:
            raise HarnessError(f"{self.name} takes one eps for all points, not a per-sample tensor")
        if float(eps) == 0:  # the ball is the point itself: evaluating there is the whole attack
            return AttackOutcome(x.clone(), candidates & predict_correct(model, x, y, self.batch_size))
        with collect_autoattack_warnings() as messages:
            x_adv, robust, unverifiable = run_autoattack(
                self.build(model, float(eps), x.device),
                x,
                y,
                batch_size=self.batch_size,
                state_path=self.state_path(eps),
            )
        return AttackOutcome(x_adv, candidates & robust, tuple(dict.fromkeys(messages)), unverifiable)


def run_autoattack(
    adversary, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, state_path: Path | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`run_standard_evaluation` with its state file; (x_adv, robust flags) in AutoAttack's batches.

    pyautoattack 0.2.0 cannot continue from its own state file (`y_adv` is unset on that path, and the
    attack set it reads back is a string), so an interrupted run is continued here from the same file:
    the attacks it has not finished run on the points it still lists as robust, in the same order and
    batches as an uninterrupted run.
    Returns (x_adv, robust flags, the points broken before an interruption, whose examples are lost).
    """
    if state_path is not None and state_path.exists():
        state = read_autoattack_state(state_path)
        if state.attacks_to_run != set(adversary.attacks_to_run):
            raise HarnessError(
                f"{state_path} belongs to another AutoAttack configuration; delete it or rerun with --force"
            )
        if state.robust_flags is not None:
            return _continue_autoattack(adversary, state, x, y, batch_size)
        state_path.unlink()
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    return x_adv, (y_adv == y), None


def read_autoattack_state(path: Path):
    """AutoAttack's `EvaluationState` from disk, repaired: pyautoattack 0.2.0 writes the attack set as
    its str() and the finished attacks as a list, and reads both back as they are."""
    from pyautoattack.state import EvaluationState

    state = EvaluationState.from_disk(path)
    planned = state._attacks_to_run
    if isinstance(planned, str):
        planned = ast.literal_eval(planned) if planned != "set()" else set()
    state._attacks_to_run = set(planned)
    state._run_attacks = set(state._run_attacks)
    return state


def _continue_autoattack(adversary, state, x, y, batch_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    robust = state.robust_flags.to(x.device).clone()
    broken_before = ~robust
    remaining = [a for a in adversary.attacks_to_run if a not in state.run_attacks]
    x_adv = x.clone()  # adversarial examples found before the interruption are not in the state file
    if remaining and bool(robust.any()):
        idx = robust.nonzero().squeeze(1)
        adversary.attacks_to_run = remaining
        sub_adv, sub_y = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
        x_adv[idx] = sub_adv
        robust[idx] = sub_y == y[idx]
    state.robust_flags = robust.cpu()
    for attack in remaining:
        state.add_run_attack(attack)
    state.to_disk(force=True)
    return x_adv, robust, broken_before


# --------------------------------------------------------------------------- Square, small budget


@dataclass(frozen=True)
class QuickSquare(EvalAttack):
    """Square with `queries` model calls per point and its p-schedule rescaled to that budget
    (pyautoattack's `resc_schedule`); margin loss, one restart. Gradient-free, so shattered or
    saturated gradients cannot mislead it; weak at 100-300 queries, which is why it is a probe for
    points the white-box attacks left robust, never a robustness number on its own."""

    name: str
    queries: int
    seed: int
    batch_size: int

    def config(self) -> dict:
        return {
            "kind": "square",
            "package": "pyautoattack",
            "queries": self.queries,
            "p_init": 0.8,
            "rescaled_schedule": True,
            "loss": "margin",
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def robust(self, model, x, y, eps, candidates) -> AttackOutcome:
        from pyautoattack.square import SquareAttack

        square = SquareAttack(
            model,
            norm="Linf",
            n_queries=self.queries,
            eps=single_eps(self.name, eps),
            p_init=0.8,
            n_restarts=1,
            seed=self.seed,
            resc_schedule=True,
            device=x.device,
        )
        return perturb_candidates(square.perturb, model, x, y, candidates, self.batch_size)


@dataclass(frozen=True)
class APGDAttack(EvalAttack):
    """pyautoattack's APGD-CE (`targeted` False) or APGD-T (targeted DLR on the `target_classes`
    most likely wrong classes), `iterations` steps per restart or target: the white-box attacks that
    AutoAttack's number rests on, run on the candidates only (the escalation after a Square alarm)."""

    name: str
    targeted: bool
    iterations: int
    seed: int
    batch_size: int
    target_classes: int = 9

    def config(self) -> dict:
        return {
            "kind": "apgd-t" if self.targeted else "apgd-ce",
            "package": "pyautoattack",
            "iterations": self.iterations,
            "target_classes": self.target_classes if self.targeted else None,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def passes_per_point(self) -> int:
        """Forward-backward passes one candidate can cost."""
        return self.iterations * (self.target_classes if self.targeted else 1)

    def robust(self, model, x, y, eps, candidates) -> AttackOutcome:
        from pyautoattack.autopgd_base import APGDAttack as CE
        from pyautoattack.autopgd_base import APGDAttack_targeted as Targeted

        settings = dict(
            n_iter=self.iterations,
            norm="Linf",
            n_restarts=1,
            eps=single_eps(self.name, eps),
            seed=self.seed,
            device=x.device,
        )
        apgd = (
            Targeted(model, n_target_classes=self.target_classes, **settings)
            if self.targeted
            else CE(model, loss="ce", **settings)
        )
        return perturb_candidates(apgd.perturb, model, x, y, candidates, self.batch_size)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class AttackInfo:
    name: str
    description: str
    build: Callable[[AttackOptions], EvalAttack]


ATTACKS: Registry[AttackInfo] = Registry("attack")


def register_attack(name: str, description: str):
    def decorate(build: Callable[[AttackOptions], EvalAttack]):
        ATTACKS.add(name, AttackInfo(name, description, build))
        return build

    return decorate


@register_attack(
    "pgd-20",
    "PGD-20 on cross-entropy, uniform start, step eps/4 (2/255 at 8/255), "
    "restarts on survivors; broken if any iterate fools",
)
def _pgd20(o: AttackOptions) -> EvalAttack:
    return PGDAttack(
        "pgd-20", steps=20, loss="ce", restarts=o.pgd_restarts, step=o.pgd_step, seed=o.seed, batch_size=o.batch_size
    )


@register_attack("cw-inf", "PGD-30 on the CW margin loss, kappa 50 (FAT/CAT/Madry convention)")
def _cw_inf(o: AttackOptions) -> EvalAttack:
    return PGDAttack(
        "cw-inf", steps=30, loss="cw", restarts=o.pgd_restarts, step=o.pgd_step, seed=o.seed, batch_size=o.batch_size
    )


def _autoattack(version: AutoAttackVersion) -> Callable[[AttackOptions], EvalAttack]:
    def build(o: AttackOptions) -> EvalAttack:
        return AutoAttackEval(
            f"autoattack-{version}",
            version,
            o.seed,
            o.batch_size,
            tuple(o.autoattack_attacks) if version == "custom" else None,
            o.state_dir,
        )

    return build


register_attack(
    "autoattack-standard",
    "AutoAttack standard: APGD-CE, APGD-T (9), FAB-T (9), Square (5000 queries), via pyautoattack",
)(_autoattack("standard"))
register_attack("autoattack-plus", "AutoAttack plus: APGD-CE/DLR (5 restarts), FAB, Square, APGD-T, FAB-T")(
    _autoattack("plus")
)
register_attack("autoattack-rand", "AutoAttack rand: APGD-CE and APGD-DLR with 20-sample EOT, for randomised models")(
    _autoattack("rand")
)
register_attack("autoattack-custom", "AutoAttack with the attacks of --autoattack-attacks (quick runs)")(
    _autoattack("custom")
)


@register_attack(
    "square", "Square attack alone (black box, 5000 queries): beating the white-box attacks flags gradient masking"
)
def _square(o: AttackOptions) -> EvalAttack:
    return AutoAttackEval("square", "custom", o.seed, o.batch_size, ("square",), o.state_dir)
