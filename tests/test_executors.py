"""Executors: the local loop and real local Ray (2 CPUs) give the same records, and a killed worker costs nothing.

One Ray instance serves the whole module. Every grid here is two PGD-AT smoke runs on the synthetic
set, compared with the local executor at the same thread count (one per run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import ray
import torch
from click.testing import CliRunner

from harness.api import run_jobs
from harness.cli import main
from harness.core.errors import HarnessError
from harness.scale.executor_cli import build_executor, target_jobs, worker_device
from harness.scale.executors import LocalExecutor, RayExecutor, summarise
from harness.scale.grid import load_grid
from harness.storage.atomic import load_torch
from harness.storage.records import read_record
from harness.training.specs import make_spec

EPOCHS = 3
SEEDS = (0, 1)
# checkpoint_sha256: last.pt holds the per-epoch log with its wall times, so its file hash differs
# between any two runs; the weights in it are compared tensor for tensor instead (same_weights).
VOLATILE = ("seconds", "created", "finished", "checkpoints", "load", "memory", "checkpoint_sha256")


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", object_store_memory=100 * 2**20
    )
    yield
    ray.shutdown()


def specs():
    return [make_spec("pgd-at", "synthetic", "smoke", seed, epochs=EPOCHS) for seed in SEEDS]


def comparable(obj):
    """A record without wall-clock times, timestamps, load, memory or its directory's path."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if not any(word in k for word in VOLATILE)}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def same_weights(run_dir: Path, reference_dir: Path) -> None:
    for name in ("last.pt", "best.pt"):
        got, want = (load_torch(d / name)["model"] for d in (run_dir, reference_dir))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def records(results: Path) -> dict[int, dict]:
    found = {}
    for path in results.glob("*/record.json"):
        record = read_record(path)
        found[record["spec"]["seed"]] = record
    return found


@pytest.fixture(scope="module")
def local_records(tmp_path_factory, run_options):
    """The reference: the local executor, one torch thread."""
    results = tmp_path_factory.mktemp("local") / "results"
    outcomes = list(LocalExecutor(threads=1).execute(run_jobs(specs(), run_options(results, progress=True)), print))
    assert [o.error for o in outcomes] == [None, None]
    return results, records(results)


def killer_after_pass_1(results: Path, spec, label: str):
    """`(say, lines, killed)`: an executor's `say` that keeps every line and SIGKILLs the worker of run
    `label` once its pass 1 is checkpointed (and before the run finishes); `killed` gets that pid."""
    lines, pids, killed = [], {}, []

    def say(line: str) -> None:
        lines.append(line)
        started = re.match(r"\[(.+?)\] started on .* \(pid (\d+),", line)
        if started:
            pids[started[1]] = int(started[2])
        if line.startswith(f"[{label}] pgd-at pass 1/{EPOCHS}") and not killed:
            record_path = results / spec.run_id / "record.json"
            deadline = time.monotonic() + 60
            while not (record_path.exists() and read_record(record_path)["epochs"]):  # pass 1 is checkpointed
                assert time.monotonic() < deadline, "pass 1 was never checkpointed"
                time.sleep(0.01)
            assert read_record(record_path)["status"] == "running", "the run finished before it could be killed"
            os.kill(pids[label], signal.SIGKILL)
            killed.append(pids[label])

    return say, lines, killed


def assert_equal_to_local(results: Path, local_records) -> dict[int, dict]:
    """Every seed's record and weights under `results` equal the local executor's; the records by seed."""
    reference = local_records[1]
    got = records(results)
    for seed in SEEDS:
        assert got[seed]["status"] == "complete" and len(got[seed]["epochs"]) == EPOCHS
        assert got[seed]["environment"]["device"]["torch_threads"] == 1
        assert comparable(got[seed]) == comparable(reference[seed])
        same_weights(results / got[seed]["run_id"], local_records[0] / reference[seed]["run_id"])
    return got


@pytest.mark.slow
def test_killed_worker_is_retried_resumes_and_records_equal_the_local_ones(
    ray_instance, local_records, run_options, tmp_path
):
    results = tmp_path / "results"
    seed0 = specs()[0]
    killed_label = f"pgd-at/synthetic/seed{seed0.seed}"
    say, lines, killed = killer_after_pass_1(results, seed0, killed_label)
    executor = RayExecutor(cpus_per_run=1, max_retries=2, shared_dir=results, poll_seconds=0.05)
    outcomes = {}
    for outcome in executor.execute(run_jobs(specs(), run_options(results, progress=True)), say):
        label = outcome.job.label  # its last line came before its outcome
        assert outcome.error is not None or any(
            line.startswith(f"[{label}] pgd-at [last] test clean") for line in lines
        ), lines
        outcomes[label] = outcome
    text = "\n".join(lines)

    assert killed, text
    assert {label: o.error for label, o in outcomes.items()} == {killed_label: None, "pgd-at/synthetic/seed1": None}
    assert outcomes[killed_label].attempts == 2 and outcomes["pgd-at/synthetic/seed1"].attempts == 1
    assert f"[{killed_label}] worker lost (WorkerCrashedError); attempt 2 of 3 resumes" in text
    resumed = re.search(rf"\[{killed_label}\] resume {seed0.run_id} after pass (\d)/{EPOCHS}", text)
    assert resumed and int(resumed[1]) >= 1, text  # from its checkpoint, not from scratch
    for label in outcomes:  # progress: every epoch of every run reached the driver
        passes = {int(p) for p in re.findall(rf"\[{re.escape(label)}\] pgd-at pass (\d)/{EPOCHS}", text)}
        assert passes == set(range(1, EPOCHS + 1)), text

    got = assert_equal_to_local(results, local_records)
    assert outcomes[killed_label].value == json.loads(json.dumps(got[seed0.seed]))
    assert not list(results.glob(".harness-driver-*"))  # the driver's marker is gone


@pytest.mark.slow
def test_ray_grid_file_from_the_command_line_matches_local(
    ray_instance, local_records, data_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # not the workers' working directory: relative paths must be resolved
    grid = Path("grid.toml")
    grid.write_text(
        f'preset = "smoke"\nmethods = ["pgd-at"]\ndatasets = ["synthetic"]\nseeds = {list(SEEDS)}\nepochs = {EPOCHS}\n'
    )
    assert [s.run_id for s in load_grid(grid).specs()] == [s.run_id for s in specs()]
    results = tmp_path / "results"
    args = ["run", "--grid", "grid.toml", "--executor", "ray", "--data-dir", str(data_dir), "--results", "results"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("clean ") >= 2 and "each job takes 1 CPU(s)" in result.output
    got, reference = records(results), local_records[1]
    assert {seed: comparable(r) for seed, r in got.items()} == {seed: comparable(r) for seed, r in reference.items()}

    again = CliRunner().invoke(main, args, catch_exceptions=False)  # a rerun skips what is finished
    assert again.exit_code == 0 and again.output.count(": already complete (use --force") == 2, again.output


@pytest.mark.slow
def test_ray_eval_per_target_matches_local(ray_instance, local_records, tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    roots = {}
    for name in ("local", "ray"):
        roots[name] = tmp_path / name
        shutil.copytree(local_records[0], roots[name])
    run_ids = sorted(
        p.name for p in roots["local"].iterdir() if p.is_dir() and not p.name.startswith(".")
    )  # not .locks
    common = ["--attack", "pgd-20", "--eps", "0,8/255", "--n", "32", "--data-dir", str(data_dir), "--cpus-per-run", "1"]
    out = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray"])):
        targets = (
            run_ids if name == "ray" else [f"{name}/{run_id}" for run_id in run_ids]
        )  # ids in a relative --results
        result = CliRunner().invoke(
            main, ["eval", *targets, "--results", name, *common, *extra], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        out[name] = result.output
    for run_id in run_ids:
        assert f"[{run_id}] clean" in out["ray"]  # each target's lines reach the driver, labelled
        evaluations = [
            json.loads(next((roots[name] / run_id / "eval").glob("*/evaluation.json")).read_text())
            for name in ("local", "ray")
        ]
        assert comparable(evaluations[0]["results"]) == comparable(evaluations[1]["results"])
        assert evaluations[0]["clean_accuracy"] == evaluations[1]["clean_accuracy"]
        assert [e["environment"]["device"]["torch_threads"] for e in evaluations] == [1, 1]


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_others_finish(ray_instance, tmp_path):
    good = tmp_path / "grid.toml"
    good.write_text('preset = "smoke"\nmethods = ["pgd-at"]\ndatasets = ["synthetic"]\nseeds = [0]\n')
    from harness.scale.executors import Job
    from harness.scale.grid import load_grid as fn

    jobs = [Job("bad", fn, (tmp_path / "absent.toml",)), Job("good", fn, (good,)), Job("bug", int, ("x",))]
    lines = []
    outcomes = {o.job.label: o for o in RayExecutor(shared_dir=tmp_path).execute(jobs, lines.append)}
    assert outcomes["good"].error is None and outcomes["good"].value.seeds == (0,)
    assert outcomes["bad"].error == f"{tmp_path / 'absent.toml'}: cannot read the grid file (No such file or directory)"
    assert outcomes["bug"].error.startswith("ValueError: invalid literal")
    assert "[bad] failed (reason in the summary at the end)" in lines
    assert any(
        line.startswith("[bug] ") and 'File "' in line and "ValueError" in line for line in lines
    )  # a bug shows its traceback (Ray's form: no "Traceback" heading)
    lines.clear()
    with pytest.raises(HarnessError, match=r"^2 of 3 jobs failed \(reasons in the summary above\): bad, bug$"):
        summarise(list(outcomes.values())[::-1], jobs, lines.append)  # completion order must not matter
    assert lines[0] == "summary: 3 jobs: 1 done, 2 failed" and f"  failed   bad: {outcomes['bad'].error}" in lines


@pytest.mark.slow
def test_a_worker_that_died_every_time_fails_after_its_retries(ray_instance, tmp_path):
    from harness.scale.executors import Job

    lines = []
    outcomes = list(RayExecutor(max_retries=1).execute([Job("dies", os._exit, (3,))], lines.append))
    assert [(o.attempts, o.error) for o in outcomes] == [(2, "worker lost on each of 2 attempts (WorkerCrashedError)")]
    assert sum("worker lost" in line for line in lines) == 1, lines  # the retry; the reason goes to the summary
    assert lines[-1] == "[dies] failed (reason in the summary at the end)", lines


@pytest.mark.slow
def test_a_job_no_node_can_start_is_said_in_one_line(ray_instance, monkeypatch):
    """--gpus-per-run 1 where no GPU is free: one line after start_warning_seconds instead of silence,
    said once however long the job waits; leaving the loop (Ctrl-C) cancels the waiting task. The
    interruption comes from the executor's own check 4 s in (several checks past the 1 s warning), so
    a dropped warning fails here instead of hanging, and a repeated one is counted."""
    from harness.scale.executors import Job, StartWatch

    class Interrupted(Exception):
        pass

    check, began = StartWatch.check, time.monotonic()

    def check_then_interrupt(self, *args):
        check(self, *args)
        if time.monotonic() - began > 4:
            raise Interrupted  # as the user's Ctrl-C would

    monkeypatch.setattr(StartWatch, "check", check_then_interrupt)
    lines: list[str] = []
    with pytest.raises(Interrupted):
        list(RayExecutor(gpus_per_run=1, start_warning_seconds=1).execute([Job("gpu", int, ("1",))], lines.append))
    said = [line for line in lines if line.startswith("ray: no job")]
    assert len(said) == 1, lines
    assert re.fullmatch(
        r"ray: no job has started after 1 s: each needs 1 CPU\(s\) and 1 GPU\(s\) and the cluster "
        r"has [\d.]+ of 2 CPU\(s\) free, 0 of 0 GPU\(s\) free; 1 job\(s\) wait for them "
        r"\(Ctrl-C stops\)",
        said[0],
    ), lines


def test_a_worker_checks_its_node_and_sets_its_threads(tmp_path):
    from harness.scale.executors import WorkerContext, code_identity

    context = WorkerContext(threads=1, code=code_identity(), marker=tmp_path / ".harness-driver-x")
    with pytest.raises(HarnessError, match="every Ray node shares"):
        context.prepare()
    other = WorkerContext(threads=1, code={**code_identity(), "commit": "0" * 40}, marker=None)
    with pytest.raises(HarnessError, match="same harness commit"):
        other.prepare()
    (tmp_path / ".harness-driver-x").write_text("")
    before = torch.get_num_threads()
    try:
        WorkerContext(threads=3, code=code_identity(), marker=tmp_path / ".harness-driver-x").prepare()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_worker_output_is_sent_line_by_line():
    from harness.scale.executors import QueueLines

    sent = []
    queue = type("FakeQueue", (), {"put": lambda self, item: sent.append(item)})()
    out = QueueLines(queue, "job")
    out.write("pass 1\npass")
    out.write(" 2\r\nlast words")
    assert sent == [("job", "pass 1"), ("job", "pass 2")]
    out.flush()
    assert sent[-1] == ("job", "last words")


def test_local_executor_reports_a_failure_and_runs_the_next_job(tmp_path):
    from harness.scale.executors import Job

    good = tmp_path / "grid.toml"
    good.write_text('preset = "smoke"\nmethods = ["pgd-at"]\ndatasets = ["synthetic"]\nseeds = [0]\n')
    lines = []
    outcomes = list(
        LocalExecutor().execute(
            [Job("bad", load_grid, (tmp_path / "absent",)), Job("good", load_grid, (good,))], lines.append
        )
    )
    assert outcomes[0].error.endswith("cannot read the grid file (No such file or directory)")
    assert outcomes[1].error is None and outcomes[1].value.seeds == (0,)
    assert lines == ["[1/2] bad", "[bad] failed (reason in the summary at the end)", "[2/2] good"]


def test_a_failure_alone_makes_the_grid_an_error_after_its_summary(tmp_path):
    """Issue 22: with one job failed and none held elsewhere, the command still ends in an error
    (exit status 2), after the summary, and the summary is printed when every job is done too."""
    from harness.scale.executors import Job, Outcome

    jobs = [Job("a", int, ()), Job("b", int, ())]
    lines: list[str] = []
    with pytest.raises(HarnessError, match=r"^1 of 2 jobs failed \(reasons in the summary above\): b$"):
        summarise([Outcome(jobs[0], 0), Outcome(jobs[1], error="broken")], jobs, lines.append)
    assert lines == ["summary: 2 jobs: 1 done, 1 failed", "  failed   b: broken"]
    lines.clear()
    summarise([Outcome(jobs[0], 0), Outcome(jobs[1], 0)], jobs, lines.append, skipped=frozenset({"b"}))
    assert lines == ["summary: 2 jobs: 1 done, 1 skipped (already complete), 0 failed"]


def test_local_executor_under_torchrun_lets_a_bug_end_the_process(tmp_path):
    """catch_all=False: a rank's unexpected error must stop every rank, not leave them out of step."""
    from harness.scale.executors import Job

    jobs = [Job("bug", int, ("x",)), Job("bad", load_grid, (tmp_path / "absent",))]
    with pytest.raises(ValueError):
        list(LocalExecutor(catch_all=False).execute(jobs, lambda _: None))
    assert [o.error is not None for o in LocalExecutor(catch_all=False).execute(jobs[1:], lambda _: None)] == [True]


class FakeRay:
    """What RayExecutor._check_resources and StartWatch read of a cluster."""

    def __init__(self, cpus: float, gpus: float, free_gpus: float):
        self.have, self.free = {"CPU": cpus, "GPU": gpus}, {"CPU": cpus, "GPU": free_gpus}

    def cluster_resources(self):
        return self.have

    def available_resources(self):
        return self.free


@pytest.mark.slow
def test_ray_without_a_gpu_share_on_a_gpu_cluster_warns_in_one_line():
    lines = []
    RayExecutor(address="auto")._check_resources(FakeRay(16, 2, 2), lines.append, local=False)
    assert lines[-1] == (
        "ray: warning: the cluster at auto has 2 GPU(s) but --gpus-per-run is 0, so every run "
        "trains on a CPU; pass --gpus-per-run 1 (or a fraction such as 0.5) to train on the GPUs"
    )
    lines.clear()
    RayExecutor(address="auto", gpus_per_run=1)._check_resources(FakeRay(16, 2, 2), lines.append, local=False)
    RayExecutor(address="auto")._check_resources(FakeRay(16, 0, 0), lines.append, local=False)
    assert not any("warning" in line for line in lines)


@pytest.mark.slow
def test_progress_lines_without_bars_where_stderr_is_no_terminal(tmp_path, run_options, capsys):
    from harness.training.runner import run

    run(make_spec("pgd-at", "synthetic", "smoke"), run_options(tmp_path, progress=True))  # progress on
    captured = capsys.readouterr()
    assert "pgd-at pass 1/1" in captured.out and "test clean" in captured.out
    assert "batch" not in captured.err and "\r" not in captured.err  # no tqdm bar went to a log


def test_retries_resume_and_never_force(tmp_path, run_options):
    opts = run_options(tmp_path, force=True)
    for job in run_jobs(specs(), opts):
        first, retry = job.args[1], job.retry_args[1]
        assert first.force and not first.resume and retry.resume and not retry.force
        assert job.retry_args[0] == job.args[0]
    settings = TargetSettings(results_dir=Path("rel"), resume=False, force=True)
    for job, target in zip(target_jobs(print, ("a", "b"), settings, "cpu"), ("a", "b"), strict=True):
        first, retry = job.args[2], job.retry_args[2]
        assert first.force and not first.resume and retry.resume and not retry.force
        assert job.args[1] == target and first.results_dir.is_absolute()  # one target each; paths for workers


@dataclasses.dataclass(frozen=True)
class TargetSettings:
    results_dir: Path
    resume: bool
    force: bool


@pytest.mark.parametrize(
    "args, message",
    [
        (["--executor", "local", "--gpus-per-run", "1"], "for --executor ray"),
        (["--executor", "local", "--address", "auto"], "for --executor ray"),
        (["--executor", "ray", "--cpus-per-run", "0"], "at least 1"),
        (["--executor", "ray", "--device", "cuda"], "--gpus-per-run"),
        (["--executor", "ray", "--device", "cpu", "--gpus-per-run", "0.5"], "hold GPUs"),
    ],
)
def test_bad_executor_options_are_one_line_errors(args, message, tmp_path):
    result = CliRunner().invoke(main, ["run", "-m", "pgd-at", "--preset", "smoke", "--results", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output


@pytest.mark.slow
def test_ray_device_follows_the_gpu_share():
    ray_cpu, ray_gpu = build_executor("ray", None, None, 0, 3, None), build_executor("ray", None, 2, 0.25, 3, None)
    assert worker_device("auto", ray_cpu) == "cpu" and worker_device("auto", ray_gpu) == "cuda"
    assert ray_cpu.cpus_per_run == 1 and ray_gpu.cpus_per_run == 2 and ray_gpu.gpus_per_run == 0.25
    assert worker_device("auto", build_executor("local", None, None, 0, 3, None)) == "auto"
