"""Fault injection on the command line: SIGKILL at named points, damaged files of every stored kind,
two processes at once, read-only and full file systems. Each case asserts exit codes and records.

Kills use the test-only hook `HARNESS_TEST_KILL_AT=<point>[:<n>]` (harness/training/faults.py); read-only
and full file systems are real tmpfs mounts in a private user+mount namespace (`unshare -rm`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.evaluation.flags import load_flags
from harness.storage.records import read_record, write_record

REPO = Path(__file__).resolve().parents[1]
RUN = ["run", "-m", "pgd-at", "--dataset", "synthetic", "--preset", "smoke", "--epochs", "2", "-q"]
EVAL = ["eval", "-a", "pgd-20", "-a", "cw-inf", "--eps", "0,8/255", "--n", "32", "-q"]


def harness(*args: str, env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "harness", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc_or_result, *fragments: str) -> str:
    """Exit 2, one line on stderr starting with 'error:', no traceback."""
    code = getattr(proc_or_result, "returncode", getattr(proc_or_result, "exit_code", None))
    text = (
        proc_or_result.stderr
        if hasattr(proc_or_result, "stderr")
        and isinstance(proc_or_result.stderr, str)
        and not hasattr(proc_or_result, "exit_code")
        else proc_or_result.output
    )
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) >= 1 and lines[-1].startswith("error: "), text
    errors = [line for line in lines if line.startswith("error: ") or "Traceback" in line]
    assert len(errors) == 1 and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def comparable(record: dict) -> dict:
    """A run record without wall-clock fields, paths and environment."""
    epochs = [
        {k: v for k, v in e.items() if not k.endswith("seconds") and k != "resources"}  # wall, CPU, load
        for e in record["epochs"]
    ]
    final = {label: {k: v for k, v in m.items() if k != "seconds"} for label, m in record["final"].items()}
    return {"epochs": epochs, "final": final, "status": record["status"], "spec": record["spec"]}


def comparable_eval(directory: Path) -> tuple[dict, dict]:
    record = json.loads((directory / "evaluation.json").read_text())
    rows = sorted((r["attack"], r["eps"], r["robust_accuracy"], r["n"]) for r in record["results"])
    checks = [(c["name"], c["passed"]) for c in record["checks"]]
    return {"rows": rows, "checks": checks, "status": record["status"], "clean": record["clean_accuracy"]}, load_flags(
        directory
    )


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted run and evaluation: what every interrupted one must resume to."""
    results = tmp_path_factory.mktemp("reference")
    done = harness(*RUN, "--data-dir", str(data_dir), "--results", str(results))
    assert done.returncode == 0, done.stderr
    (run_dir,) = [p for p in results.iterdir() if (p / "record.json").exists()]
    evaluated = harness(*EVAL, str(run_dir), "--data-dir", str(data_dir))
    assert evaluated.returncode == 0, evaluated.stderr
    (eval_dir,) = run_dir.glob("eval/last-*")
    return run_dir, eval_dir


# --------------------------------------------------------------------------- kill points

TRAINING_KILLS = [
    "train-batch:6",  # mid-epoch, in the second pass (smoke: 4 minibatches a pass)
    "before-replace:last.pt:2",  # mid-checkpoint write: the temp file is complete, not yet renamed
    "final-evaluation",  # after training, before the test-set evaluation
    "before-replace:record.json:3",  # mid-write of the final, complete record
]


@pytest.mark.slow
@pytest.mark.parametrize("point", TRAINING_KILLS)
def test_killed_run_resumes_to_the_uninterrupted_record(point, reference, data_dir, tmp_path):
    killed = harness(*RUN, "--data-dir", str(data_dir), "--results", str(tmp_path), env={"HARNESS_TEST_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = harness(*RUN, "--data-dir", str(data_dir), "--results", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    run_dir = tmp_path / reference[0].name
    assert comparable(read_record(run_dir / "record.json")) == comparable(read_record(reference[0] / "record.json"))
    assert not list(run_dir.glob(".*.tmp"))  # the killed write's temp file was cleaned up


EVAL_KILLS = [
    "after-replace:flags.npz:3",  # flags hold one cell more than the record (the 8-of-9-rows case)
    "after-replace:flags.npz:6",  # final commit: flags with the worst case, record not yet complete
    "before-replace:evaluation.json:2",
]


@pytest.mark.slow
@pytest.mark.parametrize("point", EVAL_KILLS)
def test_killed_evaluation_resumes_to_the_uninterrupted_result(point, reference, data_dir, tmp_path):
    run_dir = tmp_path / reference[0].name
    shutil.copytree(reference[0], run_dir, ignore=shutil.ignore_patterns("eval"))
    killed = harness(*EVAL, str(run_dir), "--data-dir", str(data_dir), env={"HARNESS_TEST_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = harness(*EVAL, str(run_dir), "--data-dir", str(data_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    (eval_dir,) = run_dir.glob("eval/last-*")
    assert eval_dir.name == reference[1].name  # identity: weights' hash + config, not the copy's path
    got, got_flags = comparable_eval(eval_dir)
    want, want_flags = comparable_eval(reference[1])
    assert got == want and got["status"] == "complete" and len(got["rows"]) == 6
    assert set(got_flags) == set(want_flags)
    assert all(np.array_equal(got_flags[k], want_flags[k]) for k in want_flags)


# --------------------------------------------------------------------------- two processes


def _stopped(proc: subprocess.Popen, lock: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = Path(f"/proc/{proc.pid}/stat").read_text().split()[2] if proc.poll() is None else "gone"
        if state == "T":
            return
        assert state != "gone", proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the first run never reached its stop point")


@pytest.mark.slow
def test_two_identical_runs_train_once(data_dir, tmp_path):
    first = harness(
        *RUN,
        "--data-dir",
        str(data_dir),
        "--results",
        str(tmp_path),
        env={"HARNESS_TEST_STOP_AT": "train-batch:6"},
        wait=False,
    )  # in pass 2: a record exists
    try:
        _stopped(first, tmp_path / ".locks")
        second = harness(*RUN, "--data-dir", str(data_dir), "--results", str(tmp_path))
        assert_one_line_error(second, "in use by another harness process", f"pid {first.pid}", "--wait")
        forced = harness(*RUN, "--data-dir", str(data_dir), "--results", str(tmp_path), "--force")
        assert_one_line_error(forced, f"pid {first.pid}")
        (lock,) = (tmp_path / ".locks").glob("*.lock")
        run_dir = tmp_path / lock.stem
        evaluated = harness(*EVAL, str(run_dir), "--data-dir", str(data_dir))
        assert_one_line_error(evaluated, f"pid {first.pid}")  # no evaluation of a run being trained
        waiting = harness(*RUN, "--data-dir", str(data_dir), "--results", str(tmp_path), "--wait", wait=False)
        time.sleep(1)
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=600) == 0, first.communicate()
        trained = (run_dir / "record.json").read_bytes()
        out, err = waiting.communicate(timeout=600)
        assert waiting.returncode == 0, out + err
        assert (run_dir / "record.json").read_bytes() == trained  # the waiter found it complete: no second training
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
    assert read_record(run_dir / "record.json")["status"] == "complete"
    assert not (run_dir / "eval").exists()


# --------------------------------------------------------------------------- damaged files (in process)


@pytest.fixture
def run_copy(reference, tmp_path):
    copy = tmp_path / "results" / reference[0].name
    shutil.copytree(reference[0], copy)
    return copy


def flip(path: Path, at: float = 0.6, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(int(len(data) * at), min(int(len(data) * at) + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def bad_utf8(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] = 0xFF
    path.write_bytes(bytes(data))


def interrupted(run_dir: Path) -> None:
    """Mark a finished run as interrupted after its last pass (as a kill before the final record does)."""
    record = read_record(run_dir / "record.json")
    write_record(run_dir / "record.json", {**record, "status": "running", "final": {}})


@pytest.mark.parametrize("label, damage", [("last", flip), ("last", truncate), ("best", flip), ("best", truncate)])
def test_damaged_checkpoint_is_named_by_eval(label, damage, run_copy, data_dir):
    damage(run_copy / f"{label}.pt")
    before = sorted(p.name for p in (run_copy / "eval").glob("*"))
    line = assert_one_line_error(
        invoke(*EVAL, str(run_copy), "--checkpoint", label, "--data-dir", str(data_dir)), f"{label}.pt"
    )
    assert "corrupt" in line
    assert sorted(p.name for p in (run_copy / "eval").glob("*")) == before  # nothing evaluated from it


@pytest.mark.parametrize("label", ["last", "best"])
def test_damaged_checkpoint_is_named_on_resume(label, run_copy, data_dir):
    interrupted(run_copy)
    flip(run_copy / f"{label}.pt")
    results = run_copy.parent
    result = invoke(*RUN, "--data-dir", str(data_dir), "--results", str(results), "--resume")
    assert_one_line_error(result, f"{label}.pt", "corrupt")
    assert read_record(run_copy / "record.json")["status"] == "running"  # nothing was finished from it


def test_swapped_checkpoint_is_refused(run_copy, data_dir):
    """A valid checkpoint that is not the one the finished run recorded (e.g. best.pt copied over last.pt)."""
    shutil.copy(run_copy / "best.pt", run_copy / "last.pt")  # a valid file with the same weights' shape
    assert_one_line_error(invoke(*EVAL, str(run_copy), "--data-dir", str(data_dir)), "last.pt", "differs")


def test_clean_accuracy_differing_from_the_record_is_refused(run_copy, data_dir):
    record = read_record(run_copy / "record.json")
    record["final"]["last"]["clean"] = (record["final"]["last"]["clean"] + 50) % 100
    write_record(run_copy / "record.json", record)
    assert_one_line_error(invoke(*EVAL, str(run_copy), "--data-dir", str(data_dir)), "clean accuracy", "refusing")


def test_crafted_checkpoint_pickle_is_refused(tmp_path, data_dir):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    result = invoke(
        *EVAL,
        str(tmp_path / "evil.pt"),
        "--model",
        "small-cnn",
        "--dataset",
        "synthetic",
        "--results",
        str(tmp_path / "r"),
        "--data-dir",
        str(data_dir),
    )
    assert_one_line_error(result, "evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", [bad_utf8, truncate, flip])
def test_damaged_record_is_skipped_by_runs_and_report_and_named_by_eval(
    damage, run_copy, reference, data_dir, tmp_path
):
    results = run_copy.parent
    healthy = results / "healthy"
    shutil.copytree(reference[0], healthy)
    damage(run_copy / "record.json")
    listed = invoke("runs", "--results", str(results))
    assert listed.exit_code == 0 and "skipped corrupt record" in listed.output and "pgd-at" in listed.output
    reported = invoke("report", "--results", str(results), "--out", str(tmp_path / "report"))
    assert reported.exit_code == 0 and "skipped corrupt run record" in reported.output, reported.output
    assert_one_line_error(invoke(*EVAL, str(run_copy), "--data-dir", str(data_dir)), "record.json")
    assert_one_line_error(invoke(*RUN, "--data-dir", str(data_dir), "--results", str(results)), "record.json")


@pytest.mark.parametrize(
    "name, damage",
    [
        ("flags.npz", truncate),
        ("flags.npz", flip),
        ("evaluation.json", bad_utf8),
        ("evaluation.json", truncate),
        ("evaluation.json", flip),
    ],
)
def test_damaged_evaluation_files_are_named(name, damage, run_copy, data_dir, tmp_path):
    (eval_dir,) = run_copy.glob("eval/last-*")
    damage(eval_dir / name)
    assert_one_line_error(invoke(*EVAL, str(run_copy), "--data-dir", str(data_dir)), name)
    assert_one_line_error(invoke(*EVAL, str(run_copy), "--data-dir", str(data_dir), "--resume"), name)
    reported = invoke("report", "--results", str(run_copy.parent), "--out", str(tmp_path / "report"))
    assert reported.exit_code == 0 and name in reported.output, reported.output


# --------------------------------------------------------------------------- bad input

BAD_SETS = ["steps=0", "steps=-5", "step_size_rel=nan", "step_size_rel=-1"]


@pytest.mark.parametrize("setting", BAD_SETS)
def test_invalid_pgd_at_settings_are_refused(setting, tmp_path, data_dir):
    result = invoke(*RUN, "--set", setting, "--data-dir", str(data_dir), "--results", str(tmp_path / "r"))
    assert_one_line_error(result, "pgd-at: ", setting.split("=")[0])
    assert not (tmp_path / "r").exists()


def test_huge_seed_is_refused_before_anything_is_written(tmp_path, data_dir):
    result = invoke(
        *RUN, "--seed", "99999999999999999999", "--data-dir", str(data_dir), "--results", str(tmp_path / "r")
    )
    assert_one_line_error(result, "--seed must be in 0..4294967295")
    assert not (tmp_path / "r").exists()


def test_report_out_at_a_file(reference, tmp_path):
    (tmp_path / "file").write_text("")
    result = invoke("report", "--results", str(reference[0].parent), "--out", str(tmp_path / "file"))
    assert_one_line_error(result, "--out")


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=16k none /mnt"], capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(),
    reason="unshare -rm (user+mount namespaces) unavailable: read-only and full file systems cannot be mounted",
)


def in_namespace(setup: str, *args: str) -> subprocess.CompletedProcess:
    """Run `harness ARGS` after the shell `setup` (mounts) in a private user+mount namespace."""
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "harness", *args])
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"set -e; {setup}; exec {command}"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@needs_namespaces
def test_read_only_data_dir_when_data_must_be_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    result = in_namespace(
        f"mount -t tmpfs -o ro,size=1m none {data}", *RUN, "--data-dir", str(data), "--results", str(tmp_path / "r")
    )
    assert_one_line_error(result, str(data))
    assert not list((tmp_path / "r").glob("*/record.json"))


@pytest.mark.slow
@needs_namespaces
def test_disk_full_mid_run(tmp_path, data_dir):
    results = tmp_path / "r"
    results.mkdir()
    result = in_namespace(
        f"mount -t tmpfs -o size=96k none {results}", *RUN, "--data-dir", str(data_dir), "--results", str(results)
    )
    assert_one_line_error(result, "No space left on device", "nothing was changed")
    # nothing half-written: in the namespace's tmpfs, gone with it; here, the directory is untouched
    assert not list(results.rglob("*.pt")) and not list(results.rglob("*.tmp"))


@needs_namespaces
def test_eval_on_a_read_only_file_system(reference, tmp_path, data_dir):
    mount = tmp_path / "ro"
    mount.mkdir()
    setup = (
        f"mount -t tmpfs -o size=64m none {mount}; cp -r {reference[0]} {mount}/; "
        f"rm -rf {mount}/{reference[0].name}/eval; mount -o remount,ro {mount}"
    )
    result = in_namespace(setup, *EVAL, str(mount / reference[0].name), "--data-dir", str(data_dir))
    assert_one_line_error(result, "Read-only file system")


@needs_namespaces
def test_report_out_on_a_read_only_file_system(reference, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    result = in_namespace(
        f"mount -t tmpfs -o ro,size=1m none {mount}",
        "report",
        "--results",
        str(reference[0].parent),
        "--out",
        str(mount / "report"),
    )
    assert_one_line_error(result, "--out", "Read-only file system")


def test_force_on_a_symlinked_run_directory_is_refused_and_keeps_both(tmp_path, data_dir):
    """Issue 22: --force deleted the run directory to restart it; through a symbolic link that would
    delete (or half-delete) whatever the link points to. One line, exit 2, link and target intact."""
    from harness.training.specs import make_spec

    results, target = tmp_path / "results", tmp_path / "elsewhere"
    results.mkdir()
    target.mkdir()
    (target / "keep.txt").write_text("not the harness's")
    link = results / make_spec("pgd-at", "synthetic", "smoke", epochs=2).run_id
    link.symlink_to(target, target_is_directory=True)
    result = invoke(*RUN, "--force", "--data-dir", str(data_dir), "--results", str(results))
    assert_one_line_error(result, f"--force would delete run directory {link}, a symbolic link to {target}")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "not the harness's"
    assert [p.name for p in results.iterdir()] == [link.name]


@pytest.mark.parametrize("edit", ["pgd-20@8/255", "autoattack-standard@8/255", "clean"])
def test_report_refuses_an_evaluation_number_edited_against_its_flags(edit, tmp_path):
    """Issue 22: an evaluation record edited by hand (its checksum line removed, so it loads) whose
    number no longer matches its per-example flags is named and skipped by the report, as `harness
    eval` refuses it (harness.evaluation.flags.vouched_cells): the edited number is never shown."""
    sys.path.insert(0, str(Path(__file__).parent))
    import report_fixture as fx

    from harness.reporting import load_results

    fx.build_results(tmp_path, runs=fx.RUNS[:1], corrupt=False)
    path = next(tmp_path.glob("*/eval/*/evaluation.json"))
    data = {k: v for k, v in json.loads(path.read_text()).items() if k != "sha256"}
    if edit == "clean":
        data["clean_accuracy"] += 5.0
    else:
        (row,) = [r for r in data["results"] if f"{r['attack']}@{r['eps']}" == edit]
        row["robust_accuracy"] += 5.0
    path.write_text(json.dumps(data))
    results = load_results(tmp_path)
    (problem,) = [p for p in results.problems if str(path) in p]
    assert problem.startswith(f"skipped evaluation {path}: ") and "does not match its record" in problem, problem
    assert edit.split("@")[0] in problem
    assert all(e.path != path for e in results.evaluations)


def test_run_with_a_file_as_results_is_one_line_and_leaves_the_file(tmp_path, data_dir):
    """Issue 22: --results naming a file is one line before any work; the file is left as it was."""
    file = tmp_path / "results"
    file.write_text("mine")
    result = invoke(*RUN, "--data-dir", str(data_dir), "--results", str(file))
    assert_one_line_error(result, f"directory {file} is not writable (it is a file); pass another --results")
    assert file.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["results"]
