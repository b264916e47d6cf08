"""Train one defense under one RunSpec: deterministic, timed, checkpointed every epoch, resumable.

Layout of a run directory (`<results>/<run_id>/`):
    record.json   the run record (status 'running' until the final evaluation is stored)
    last.pt       model, optimiser, defense state, RNG states, per-epoch log (for --resume)
    best.pt       model weights with the best PGD accuracy on the validation split
"""

from __future__ import annotations

import datetime as dt
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from harness.core.config import RunSpec
from harness.core.datasets import DATASETS, DatasetInfo, Split, TensorLoader, load_split, split_train_val
from harness.core.defense import DEFENSES, Defense, DefenseContext
from harness.core.environment import environment, synchronize
from harness.core.errors import HarnessError
from harness.core.models import build_model
from harness.core.protocol import record_field
from harness.scale import distributed
from harness.scale.distributed import World
from harness.storage.atomic import ensure_writable_dir, load_torch, save_torch
from harness.storage.integrity import checkpoint_hashes
from harness.storage.locks import LockedError, hold, remove_stale_temps
from harness.storage.records import RECORD_NAME, SCHEMA_VERSION, collapse_message, read_record, write_record
from harness.training import faults, precision
from harness.training.engine import Execution
from harness.training.final_eval import clean_and_pgd
from harness.training.optim import sgd_for
from harness.training.resources import EpochMeter, is_out_of_memory


def as_is(pass_index: int) -> AbstractContextManager[Any]:
    """The default `RunOptions.around_pass`: nothing around any pass."""
    return nullcontext()


@dataclass(frozen=True)
class RunOptions:
    """How a run is executed (where, resume or force, output); none of it is part of the run's identity.

    `around_pass(pass_index)` returns a context manager the runner enters around each training pass
    (0-based; the pass alone, not its validation or checkpoint), on every rank: a seam to profile or
    watch a pass, or to stop a run at a chosen pass (an exception raised there leaves the run as a
    crash there would, resumable from the last checkpoint). The default does nothing.
    """

    results_dir: Path
    data_dir: Path | None
    device: torch.device
    resume: bool = False
    force: bool = False
    download: bool = True
    progress: bool = True  # a line per epoch; bars too where stderr is a terminal (not a log, not a Ray worker)
    wait: bool = False  # wait for another process holding this run's lock instead of failing
    world: World = distributed.SINGLE  # this process's place in a torchrun launch
    around_pass: Callable[[int], AbstractContextManager[Any]] = as_is


@dataclass(frozen=True)
class Decision:
    """What every rank does with a run: rank 0 decides it under the run's lock and broadcasts it."""

    action: Literal["skip", "train", "fail"]
    resume: bool = False  # train: continue from last.pt
    message: str = ""  # fail: the one-line reason every rank raises
    locked: bool = False  # fail: another live process holds the run (still running there, not failed)


@dataclass
class PreparedData:
    train: TensorLoader
    val: Split  # float images on the device
    test: Split
    test_indices: list[int]
    held_out: Split | None = None  # carved from the training subset for the defense (Defense.held_out_size)


def prepare_data(spec: RunSpec, info: DatasetInfo, options: RunOptions) -> PreparedData:
    train_split = load_split(info, options.data_dir, train=True, download=options.download)
    test_split = load_split(info, options.data_dir, train=False, download=options.download)
    train_idx, val_idx = split_train_val(
        len(train_split.labels), spec.data.val_size, spec.data.val_seed, spec.data.train_subset
    )
    n_held = DEFENSES.get(spec.defense).held_out_size(spec.defense_config, len(train_idx))
    if n_held:  # a seeded random share of the training subset, as the validation split is drawn
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(spec.data.val_seed + 1))
        train_idx, held_idx = train_idx[order[n_held:]].sort().values, train_idx[order[:n_held]].sort().values
    loader = TensorLoader(
        train_split,
        train_idx,
        spec.schedule.batch_size,
        options.device,
        shuffle=True,
        augment=spec.data.augment,
        seed=spec.seed,
    )
    n_test = (
        len(test_split.labels)
        if spec.eval.test_examples is None
        else min(spec.eval.test_examples, len(test_split.labels))
    )

    def to_device(split: Split, idx: torch.Tensor) -> Split:
        return Split(split.images[idx].float().div(255).to(options.device), split.labels[idx].to(options.device))

    return PreparedData(
        loader,
        to_device(train_split, val_idx),
        to_device(test_split, torch.arange(n_test)),
        list(range(n_test)),
        to_device(train_split, held_idx) if n_held else None,
    )


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Meter:
    """Batch-size-weighted means of step statistics, kept on the device until read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, stats: dict[str, torch.Tensor], n: int) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * n
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}


PROGRESS_SECONDS = 30.0  # the progress bar's loss display reads the device this often at most


class Run:
    def __init__(self, spec: RunSpec, options: RunOptions):
        self.spec = spec
        self.options = options
        self.world = options.world
        self.dir = Path(options.results_dir) / spec.run_id
        self.record_path = self.dir / RECORD_NAME
        self.info = DATASETS.get(spec.dataset)
        self.device = options.device

    # ---------------------------------------------------------------- lifecycle

    def execute(self) -> dict[str, Any]:
        """Rank 0 alone takes the run's lock and decides (skip, train, resume, or fail with a reason);
        every rank then does what it was told, so no rank can train a run the others skipped."""
        if self.spec.world_size != self.world.size:
            raise HarnessError(
                f"run {self.spec.run_id} is specified for {self.spec.world_size} process(es) but "
                f"{self.world.size} are running it (world size is part of a run's identity)"
            )
        with ExitStack() as held:
            decision = distributed.broadcast_from_main(self._decide_on_main(held), self.world)
            if decision.action == "fail":
                raise (LockedError if decision.locked else HarnessError)(decision.message)
            if decision.action == "skip":
                self._say(f"skip {self.spec.run_id}: already complete (use --force to rerun)")
                return read_record(self.record_path)
            distributed.barrier(self.world)
            record = self._train_and_evaluate(resume=decision.resume)
            distributed.barrier(self.world)
            return record if self.world.is_main else read_record(self.record_path)

    def _decide_on_main(self, held: ExitStack) -> Decision | None:
        """Rank 0's decision, taken under the run's lock (kept in `held` while the ranks train)."""
        if not self.world.is_main:
            return None
        try:
            ensure_writable_dir(Path(self.options.results_dir), "--results")
            held.enter_context(hold(self.dir, what=f"run {self.spec.run_id}", wait=self.options.wait))
            remove_stale_temps(self.dir)
            return self._decide()
        except HarnessError as exc:
            return Decision("fail", message=str(exc), locked=isinstance(exc, LockedError))
        except Exception as exc:
            if self.world.distributed:  # the other ranks must not wait for a decision that never comes
                distributed.broadcast_from_main(Decision("fail", message=f"rank 0 failed: {exc!r}"), self.world)
            raise

    def _decide(self) -> Decision:
        existing = self._existing_record()
        if existing is not None and existing["status"] == "complete" and not self.options.force:
            return Decision("skip")
        resuming = existing is not None and not self.options.force
        if resuming and not self.options.resume:
            done = len(existing["epochs"])
            return Decision(
                "fail",
                message=f"run {self.spec.run_id} was interrupted after {done} epoch(s); "
                f"pass --resume to continue it or --force to start over",
            )
        if self.world.is_main and self.options.force and self.dir.exists():
            shutil.rmtree(self.dir)
        return Decision("train", resume=resuming)

    def _existing_record(self) -> dict[str, Any] | None:
        return read_record(self.record_path) if self.record_path.exists() else None

    def _say(self, text: str) -> None:
        if self.options.progress and self.world.is_main:
            tqdm.write(text)

    # ---------------------------------------------------------------- training

    def _build_model(self) -> torch.nn.Module:
        net = build_model(self.spec.model, self.info, self.spec.dropout).to(self.device)
        if self.world.distributed and self.spec.batchnorm == "global":
            net = distributed.global_batchnorm(net, self.device)
        return net

    def _train_and_evaluate(self, resume: bool) -> dict[str, Any]:
        world, t = self.world, self._set_up()
        passes = t.budget.passes
        record = self._new_record(t.defense, t.data, t.budget)
        record["execution"] = t.execution.describe(self.spec.batchnorm)
        warning = precision.slow_precision_warning(self.spec.precision, self.device)
        if warning is not None and world.is_main:
            tqdm.write(warning, file=sys.stderr)
        start, best_val = self._resume(t, record) if resume else (0, -1.0)
        distributed.check_agreement(start, world, f"run {self.spec.run_id}: the pass to resume after")
        for p in range(start, passes):
            if world.distributed:  # per rank and per pass, so a resumed run replays the same noise
                torch.manual_seed(distributed.pass_seed(self.spec.seed, p, world.rank))
            with self.options.around_pass(p):
                entry = self._train_pass(t.execution, t.optimizer, t.defense, t.data, p, t.budget)
            if world.is_main:
                record["epochs"].append(self._validate(t.net, t.data, entry, passes))
                best_val = self._checkpoint(t, record, p, best_val)
            distributed.barrier(world)
        if world.is_main:
            self._finish(t, record)
        return record

    def _set_up(self) -> Training:
        """Data (rank 0 first), the seeded model, the defense, the optimiser and how the model executes."""
        spec, world = self.spec, self.world
        if not world.is_main:  # rank 0 downloads or writes the data set first
            distributed.barrier(world)
        data = prepare_data(spec, self.info, self.options)
        if world.is_main:
            distributed.barrier(world)
        if world.distributed:
            distributed.check_batches(data.train.num_examples, spec.schedule.batch_size, world)
        torch.manual_seed(spec.seed)
        random.seed(spec.seed)
        net = self._build_model()
        context = DefenseContext(
            eps=spec.eps,
            dataset=self.info,
            train_size=data.train.num_examples,
            epochs=spec.schedule.epochs,
            device=self.device,
            held_out=data.held_out,
        )
        defense: Defense = DEFENSES.get(spec.defense)(spec.defense_config, context)
        Execution.check_defense(defense, world)
        defense.setup(net)
        optimizer = sgd_for(net, spec.schedule)
        execution = Execution.prepare(net, spec.precision, spec.compile, world, self.device)
        return Training(
            net,
            data,
            defense,
            optimizer,
            execution,
            MinibatchBudget(spec.schedule.epochs, len(data.train), defense.replays),
        )

    def _resume(self, t: Training, record: dict[str, Any]) -> tuple[int, float]:
        """Restore everything last.pt holds; returns (passes done, best validation PGD so far)."""
        ckpt = load_torch(self.dir / "last.pt", self.device)
        t.net.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.defense.load_state_dict(ckpt["defense"])
        t.execution.scaler.load_state_dict(ckpt.get("scaler", {}))
        _set_rng_state(ckpt["rng"])
        record["epochs"] = ckpt["epochs"]
        self._say(f"resume {self.spec.run_id} after pass {ckpt['passes_done']}/{t.budget.passes}")
        return ckpt["passes_done"], ckpt["best_val_pgd"]

    def _checkpoint(self, t: Training, record: dict[str, Any], p: int, best_val: float) -> float:
        """After pass p (rank 0): best.pt when validation PGD improved, last.pt, the record; the new best."""
        val_pgd = record["epochs"][-1]["val"]["pgd"]
        if val_pgd > best_val:
            best_val = val_pgd
            save_torch(self.dir / "best.pt", {"model": t.net.state_dict(), "pass": p + 1, "val_pgd": best_val})
        save_torch(
            self.dir / "last.pt",
            {
                "model": t.net.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "defense": t.defense.state_dict(),
                "rng": _rng_state(),
                "passes_done": p + 1,
                "best_val_pgd": best_val,
                "epochs": record["epochs"],
                "scaler": t.execution.scaler.state_dict(),
            },
        )
        write_record(self.record_path, record)
        return best_val

    def _finish(self, t: Training, record: dict[str, Any]) -> None:
        """Rank 0: the final evaluation, the collapse diagnostics, checkpoint hashes, status complete."""
        faults.reached("final-evaluation")
        record["final"] = self._final_evaluation(t.net, t.data, t.budget.passes)
        record["diagnostics"] = collapse_diagnostics(record["final"], self.info.num_classes)
        if (message := collapse_message(record)) is not None:
            tqdm.write(f"warning: {message}", file=sys.stderr)
        record["checkpoint_sha256"] = checkpoint_hashes(self.dir)  # evaluations bind to these files
        record["status"] = "complete"
        record["finished"] = _now()
        write_record(self.record_path, record)

    def _train_pass(
        self, execution: Execution, optimizer, defense: Defense, data: PreparedData, p: int, budget: MinibatchBudget
    ) -> dict[str, Any]:
        """One pass over the data. Nothing here reads the device per step: the meter's sums stay on
        it until the pass ends (the progress bar shows them at most every PROGRESS_SECONDS)."""
        spec, loader, world = self.spec, data.train, self.world
        n_batches = budget.minibatches_in_pass(p)
        defense.start_epoch(p)
        meter = Meter()
        visited = (
            torch.zeros(data.train.num_examples, dtype=torch.bool, device=self.device) if world.distributed else None
        )
        bar = self._progress_bar(n_batches, p, budget.passes)
        execution.train_model.train()
        synchronize(self.device)
        timer = EpochMeter(self.device).start()
        shown = time.perf_counter()
        for i, batch in zip(range(n_batches), loader.epoch(p)):
            for group in optimizer.param_groups:
                group["lr"] = spec.schedule.lr_at(budget.equivalent_epoch(p, i))
            local = execution.shard(batch)
            if visited is not None:
                visited[local.index] = True
            stats = _step(execution, defense, optimizer, local, len(batch.y))
            meter.add(stats, len(local.y))
            faults.reached("train-batch")
            bar.update(1)
            if bar.disable is False and time.perf_counter() - shown > PROGRESS_SECONDS:
                bar.set_postfix({k: f"{v:.3f}" for k, v in meter.means().items()}, refresh=False)
                shown = time.perf_counter()
        synchronize(self.device)
        resources = timer.finish()
        bar.close()
        meter.sums, meter.count = distributed.reduce_sums(meter.sums, meter.count, world)
        execution.end_pass(defense, visited, spec.batchnorm)
        diagnostics = defense.end_epoch(p)
        entry = _pass_entry(p, n_batches, budget, optimizer, resources, meter.means(), diagnostics)
        if execution.scaler.enabled:
            entry["loss_scale"] = execution.scaler.scale
        return entry

    def _progress_bar(self, n_batches: int, p: int, passes: int) -> tqdm:
        """The pass's bar (rank 0, with progress on); its postfix is refreshed at most every PROGRESS_SECONDS."""
        return tqdm(
            total=n_batches,
            desc=f"{self.spec.defense} {p + 1}/{passes}",
            unit="batch",
            disable=None if (self.options.progress and self.world.is_main) else True,
            leave=False,
            dynamic_ncols=True,
        )

    def _validate(self, net, data: PreparedData, entry: dict[str, Any], passes: int) -> dict[str, Any]:
        """PGD on the validation split (fp32, eval mode, the plain model) to choose `best`."""
        spec = self.spec
        t1 = time.perf_counter()
        val = clean_and_pgd(
            net,
            data.val.images,
            data.val.labels,
            eps=float(spec.eps),
            step_size=float(spec.eval_step),
            steps=spec.eval.val_pgd_steps,
            batch_size=spec.eval.batch_size,
        ).summary()
        synchronize(self.device)
        entry = {**entry, "val_seconds": time.perf_counter() - t1, "val": val}
        self._say(
            f"{spec.defense} pass {entry['pass']}/{passes}: "
            f"{entry['train_seconds']:.1f}s  "
            + "  ".join(f"{k} {v:.3f}" for k, v in entry["train"].items())
            + f"  val clean {val['clean']:.1f}  val pgd{spec.eval.val_pgd_steps} {val['pgd']:.1f}"
        )
        return entry

    def _final_evaluation(self, model, data: PreparedData, passes: int) -> dict[str, Any]:
        """Clean and PGD-k on the test subset for the last and the best-on-validation weights."""
        spec = self.spec
        last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        best = load_torch(self.dir / "best.pt", self.device)
        final: dict[str, Any] = {}
        for label, state, chosen_pass in (("last", last_state, passes), ("best", best["model"], best["pass"])):
            if label == "best" and chosen_pass == passes:  # the same weights: the same numbers
                final["best"] = {**final["last"], "same_as": "last"}
                continue
            model.load_state_dict(state)
            torch.manual_seed(spec.seed + 1)  # the same attack randomness for every checkpoint
            bar = tqdm(
                total=len(data.test.labels),
                desc=f"eval {label}",
                unit="img",
                disable=None if self.options.progress else True,
                leave=False,
            )
            t0 = time.perf_counter()
            acc = clean_and_pgd(
                model,
                data.test.images,
                data.test.labels,
                eps=float(spec.eps),
                step_size=float(spec.eval_step),
                steps=spec.eval.pgd_steps,
                restarts=spec.eval.pgd_restarts,
                batch_size=spec.eval.batch_size,
                progress=bar,
            )
            bar.close()
            final[label] = {
                **acc.summary(),
                "pass": chosen_pass,
                "seconds": time.perf_counter() - t0,
                "predicted_classes": acc.class_counts(self.info.num_classes),
            }
            self._say(
                f"{spec.defense} [{label}] test clean {final[label]['clean']:.2f}  "
                f"PGD-{spec.eval.pgd_steps} {final[label]['pgd']:.2f}  (n={final[label]['n']})"
            )
        model.load_state_dict(last_state)
        return final

    def _new_record(self, defense: Defense, data: PreparedData, budget: MinibatchBudget) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "run_id": self.spec.run_id,
            "status": "running",
            "spec": self.spec.to_dict(),
            "defense": defense.record(),
            "reference_protocol": record_field(defense, self.spec.to_dict(), defense.record()),
            "environment": environment(self.device),
            "created": _now(),
            "protocol": {
                "passes": budget.passes,
                "minibatches": budget.total,
                "sgd_steps": budget.total * budget.replays,
                "equivalent_epochs": budget.epochs,
                "train_examples": data.train.num_examples,
                "val_examples": len(data.val.labels),
                "held_out_examples": 0 if data.held_out is None else len(data.held_out.labels),
                "test_indices": f"0..{len(data.test_indices) - 1}",
                "eval_attack": {
                    "name": "pgd",
                    "steps": self.spec.eval.pgd_steps,
                    "step_size": f"{self.spec.eval_step}",
                    "restarts": self.spec.eval.pgd_restarts,
                    "bn": "eval",
                    "random_start": True,
                },
            },
            "epochs": [],
            "final": {},
            "checkpoints": {"last": str(self.dir / "last.pt"), "best": str(self.dir / "best.pt")},
        }


# A checkpoint that puts this share of its test predictions in one class is collapsed. Not 0.99: ADES in
# fp16 diverged (loss 2.1 -> 6.9) to 968 of 1000 predictions in one class, at chance accuracy; a model that
# learned anything on a balanced 10-class test subset is far below 0.9.
COLLAPSE_SHARE = 0.9


def collapse_diagnostics(final: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """`collapsed`: the checkpoints ('last', 'best') whose predictions fall (almost) all in one class."""
    collapsed = [
        label
        for label, entry in final.items()
        if max(entry["predicted_classes"]) >= COLLAPSE_SHARE * max(sum(entry["predicted_classes"]), 1)
    ]
    return {"collapsed": collapsed, "collapse_share": COLLAPSE_SHARE, "num_classes": num_classes}


def _step(execution: Execution, defense: Defense, optimizer, local, global_batch: int) -> dict[str, Any]:
    """One training step; running out of memory is said with the batch that did it, in one line."""
    try:
        return execution.train_step(defense, optimizer, local)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise execution.out_of_memory(defense, optimizer, local, global_batch) from None
        raise


def _pass_entry(
    p: int, n_batches: int, budget: MinibatchBudget, optimizer, resources: dict, train: dict, diagnostics: dict
) -> dict[str, Any]:
    """The record's entry for pass p: schedule position, time and resources, training means, diagnostics."""
    return {
        "pass": p + 1,
        "minibatches": n_batches,
        "equivalent_epoch": budget.equivalent_epoch(p, n_batches),
        "lr": optimizer.param_groups[0]["lr"],
        "train_seconds": resources["wall_seconds"],
        "cpu_seconds": resources["cpu_seconds"],
        "resources": resources,
        "train": train,
        "defense": diagnostics,
    }


@dataclass(frozen=True)
class Training:
    """What one run trains with, built once by `Run._set_up` and restored by `Run._resume`."""

    net: torch.nn.Module
    data: PreparedData
    defense: Defense
    optimizer: torch.optim.Optimizer
    execution: Execution
    budget: MinibatchBudget


@dataclass(frozen=True)
class MinibatchBudget:
    """How many minibatches a run trains on, so every defense takes the schedule's SGD steps.

    A defense that replays each minibatch `replays` times (Free-AT's m) sees `epochs / replays`
    passes over the data; the last pass stops early when that is not a whole number, so the SGD
    step count, and with it the lr schedule in equivalent epochs, matches PGD-AT's exactly.
    """

    epochs: int
    batches_per_pass: int
    replays: int

    @property
    def total(self) -> int:
        return math.ceil(self.epochs * self.batches_per_pass / self.replays)

    @property
    def passes(self) -> int:
        return math.ceil(self.total / self.batches_per_pass)

    def minibatches_in_pass(self, p: int) -> int:
        return min(self.batches_per_pass, self.total - p * self.batches_per_pass)

    def equivalent_epoch(self, p: int, i: int) -> float:
        """Equivalent epochs (SGD steps / batches per pass) done before minibatch i of pass p."""
        return (p * self.batches_per_pass + i) * self.replays / self.batches_per_pass


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run(spec: RunSpec, options: RunOptions) -> dict[str, Any]:
    return Run(spec, options).execute()
