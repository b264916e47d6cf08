"""Shared fixtures: tiny data sets written in the real on-disk formats, and a briefly trained model."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import methods  # noqa: F401  (registers every defense)
from harness.core.datasets import DATASETS, Batch, load_split, write_synthetic_cifar

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory holding the synthetic set as CIFAR-10 pickle batches."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_cifar(root / "synthetic-batches-py", n_train=600, n_test=200)
    return root


@pytest.fixture(scope="session")
def synthetic_info():
    return DATASETS.get("synthetic")


@pytest.fixture(scope="session")
def _trained_small_cnn(data_dir, synthetic_info):
    """small-cnn after clean SGD steps on synthetic data until the mean true-class probability
    reaches 0.7: most examples classified correctly, several with a soft margin (MMA's "correct"
    needs p_y > 1/2), so defenses that treat correct and misclassified examples differently see
    both kinds. (A fixed 60 steps left this model at chance: its learning curve is a cliff.)"""
    from harness.core.models import build_model

    torch.manual_seed(0)
    split = load_split(synthetic_info, data_dir, train=True)
    model = build_model("small-cnn", synthetic_info)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = split.images.float() / 255, split.labels
    for step in range(300):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 4:
            with torch.no_grad():
                if F.softmax(model(x[:128]), 1).gather(1, y[:128, None]).mean() >= 0.7:
                    break
    return model


@pytest.fixture
def trained_model(_trained_small_cnn):
    return copy.deepcopy(_trained_small_cnn)


@pytest.fixture(scope="session")
def train_batch(data_dir, synthetic_info) -> Batch:
    split = load_split(synthetic_info, data_dir, train=True)
    x = split.images[:32].float() / 255
    return Batch(x.contiguous(memory_format=torch.channels_last), split.labels[:32], torch.arange(32))


# --------------------------------------------------------------------------- the tests' usual run


@pytest.fixture(scope="session")
def smoke_run_args(data_dir):
    """`smoke_run_args(results, *extra, defenses=("pgd-at",), data=data_dir)`: the `harness run` arguments of
    the tests' usual run (the smoke preset on the synthetic set, quiet), into `results`, `extra` appended."""

    def args(results: Path, *extra: str, defenses: tuple[str, ...] = ("pgd-at",), data: Path = data_dir) -> list[str]:
        chosen = [word for name in defenses for word in ("-m", name)]
        usual = ["--dataset", "synthetic", "--preset", "smoke", "-q", "--data-dir", str(data)]
        return ["run", *chosen, *usual, "--results", str(results), *extra]

    return args


@pytest.fixture(scope="session")
def train_smoke_run(smoke_run_args):
    """`train_smoke_run(results)`: the smoke PGD-AT run made through the CLI into `results`; its directory."""
    from click.testing import CliRunner

    from harness.cli import main

    def train(results: Path) -> Path:
        out = CliRunner().invoke(main, smoke_run_args(results))
        assert out.exit_code == 0, out.output
        (run,) = [p for p in results.iterdir() if (p / "record.json").exists()]
        return run

    return train


@pytest.fixture(scope="module")
def run_dir(train_smoke_run, tmp_path_factory):
    """A smoke PGD-AT run made through the CLI, one per test module (modules add evaluations to it)."""
    return train_smoke_run(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="session")
def run_options(data_dir):
    """`run_options(results, **changes)`: the RunOptions of a test run (the CPU, the tests' data, no
    progress output), any field changed by keyword."""
    from harness.training.runner import RunOptions

    def make(results: Path, **changes) -> RunOptions:
        defaults = {"results_dir": results, "data_dir": data_dir, "device": torch.device("cpu"), "progress": False}
        return RunOptions(**{**defaults, **changes})

    return make


@pytest.fixture
def passes_trained():
    """`(hook, trained)`: a `RunOptions.around_pass` hook that notes each pass it is entered for in `trained`."""
    trained: list[int] = []

    def note(pass_index: int) -> contextlib.AbstractContextManager:
        trained.append(pass_index)
        return contextlib.nullcontext()

    return note, trained


@pytest.fixture(scope="session")
def interrupt_at_pass():
    """`interrupt_at_pass(n, error=KeyboardInterrupt)`: a `RunOptions.around_pass` hook that raises `error`
    as training pass n (0-based) starts, as a crash there would: passes 0..n-1 are checkpointed, n is not."""

    def hook_for(n: int, error: type[BaseException] = KeyboardInterrupt):
        def around_pass(pass_index: int) -> contextlib.AbstractContextManager:
            if pass_index == n:
                raise error(f"interrupted as pass {n} starts")
            return contextlib.nullcontext()

        return around_pass

    return hook_for
