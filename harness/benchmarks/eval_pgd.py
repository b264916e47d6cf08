"""Our PGD-20 evaluation over torchattacks' PGD-20: same model, data, eps, steps, step and batch.

Both sides produce per-sample robust flags: torchattacks' x_adv plus one forward to read them; ours
computes the clean flags, attacks only the clean-correct points and drops a point at the first
iterate that fools it (the any-iterate count, which is exact and the stronger one). The model is a
small CNN given a brief PGD-AT warm-up here, so that a realistic share of points resists (how much
early exit can save depends on it; the notes print clean and robust accuracy). A third variant,
the shared PGD loop without early exit, shows the loop's own speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.benchmarks.timing import BenchOptions, BenchResult, alternate, register_benchmark
from harness.core.datasets import DATASETS, load_split
from harness.core.errors import HarnessError
from harness.core.models import build_model
from harness.core.pgd import frozen_parameters, model_mode, pgd
from harness.evaluation.attacks import PGDAttack

TARGET = 0.8
STEPS = 20


def bench_data(n_train: int, n_test: int, device: torch.device):
    """Fashion-MNIST when it is on disk, else the synthetic set (written on first use)."""
    for name in ("fashion-mnist", "synthetic"):
        info = DATASETS.get(name)
        try:
            train = load_split(info, None, train=True, download=False)
            test = load_split(info, None, train=False, download=False)
        except HarnessError:
            continue
        prep = lambda s, n: (s.images[:n].float().div(255).to(device), s.labels[:n].to(device))  # noqa: E731
        return info, prep(train, n_train), prep(test, n_test)
    raise HarnessError(
        "no data set for the eval-pgd benchmark: install Fashion-MNIST or let the synthetic set be written"
    )


def warm_up_pgd_at(model, x, y, eps: float, steps: int, batch: int = 128) -> None:
    """A few PGD-5 AT steps: enough for the model to resist part of the attack."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen).to(x.device)
        x_adv = pgd(model, x[idx], y[idx], eps, steps=5, step_size=eps / 4, mode="eval")
        model.train()
        loss = F.cross_entropy(model(x_adv), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@register_benchmark(
    "eval-pgd", "our PGD-20 evaluation over torchattacks' PGD-20, same model/data/eps/steps; target <= 0.8"
)
def eval_pgd(options: BenchOptions) -> list[BenchResult]:
    import torchattacks

    n_test, warm = (128, 10) if options.quick else (1000, 150)
    info, (xt, yt), (x, y) = bench_data(4000, n_test, options.device)
    eps = float(info.eps)
    torch.manual_seed(0)
    model = build_model("small-cnn", info).to(options.device)
    warm_up_pgd_at(model, xt, yt, eps, warm)
    ours = PGDAttack("pgd-20", steps=STEPS, loss="ce", restarts=1, step="eps/4", seed=0, batch_size=len(y))
    theirs = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=STEPS, random_start=True)

    contenders = _contenders(model, x, y, eps, ours, theirs)
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean().item() * 100
    robust_acc = contenders["ours: PGD-20 flags (early exit)"]().float().mean().item() * 100
    seconds = alternate(contenders, options)
    ratio, ratio_spread = seconds.ratio("ours: PGD-20 flags (early exit)", "torchattacks PGD-20 + flags")
    loop, loop_spread = seconds.ratio("shared pgd, no early exit + flags", "torchattacks PGD-20 + flags")
    return [
        BenchResult(
            spreads={"ours / torchattacks": ratio_spread, "no-early-exit loop / torchattacks": loop_spread},
            machine=seconds.machine,
            name=f"PGD-20 evaluation, small-cnn on {info.name}, {len(y)} points, eps {info.eps} "
            f"({options.device.type})",
            seconds=dict(seconds),
            ratios={"ours / torchattacks": ratio, "no-early-exit loop / torchattacks": loop},
            targets={"ours / torchattacks": TARGET},
            notes=f"model after {warm} PGD-AT steps: clean {clean_acc:.1f}%, PGD-20 {robust_acc:.1f}%",
        )
    ]


def _contenders(model, x: torch.Tensor, y: torch.Tensor, eps: float, ours: PGDAttack, theirs) -> dict:
    """The three timed calls, each ending in per-sample robust flags (what an evaluation needs)."""

    def run_ours() -> torch.Tensor:
        with model_mode(model, "eval"), frozen_parameters(model):
            with torch.no_grad():
                clean = model(x).argmax(1) == y
            return ours.robust(model, x, y, eps, clean).robust

    def run_theirs() -> torch.Tensor:
        x_adv = theirs(x, y)
        with torch.no_grad():
            return model(x_adv).argmax(1) == y

    def run_plain() -> torch.Tensor:
        x_adv = pgd(model, x, y, eps, steps=STEPS, step_size=eps / 4, mode="eval")
        with torch.no_grad():
            return model(x_adv).argmax(1) == y

    return {
        "ours: PGD-20 flags (early exit)": run_ours,
        "torchattacks PGD-20 + flags": run_theirs,
        "shared pgd, no early exit + flags": run_plain,
    }
