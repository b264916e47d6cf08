"""`harness eval` end to end on a smoke-preset run, resuming, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.core.datasets import DATASETS
from harness.core.models import build_model
from harness.evaluation.flags import load_flags


def eval_args(data_dir, *extra):
    return [
        "eval",
        *extra,
        "--n",
        "48",
        "-a",
        "pgd-20",
        "-a",
        "cw-inf",
        "--eps",
        "0,4/255,8/255",
        "--data-dir",
        str(data_dir),
        "-q",
    ]


def test_eval_writes_the_contract_record_and_flags(run_dir, data_dir):
    out = CliRunner().invoke(main, eval_args(data_dir, str(run_dir), "--checkpoint", "best"))
    assert out.exit_code == 0, out.output
    (path,) = run_dir.glob("eval/best-*/evaluation.json")
    record = json.loads(path.read_text())
    assert record["kind"] == "evaluation" and record["schema"] == 1 and record["n"] == 48
    assert record["checkpoint"]["source"] == "harness" and record["checkpoint"]["label"] == "best"
    assert record["checkpoint"]["defense"] == "pgd-at" and record["test_indices"] == "0..47"
    assert record["config"]["eps"] == ["0", "4/255", "8/255"]
    assert {(r["attack"], r["eps"]) for r in record["results"]} == {
        (a, e) for a in ("pgd-20", "cw-inf", "worst-case") for e in ("0", "4/255", "8/255")
    }
    flags = load_flags(path.parent)
    assert set(flags) == {"clean"} | {
        f"{a}@{e}" for a in ("pgd-20", "cw-inf", "worst-case") for e in ("0", "4/255", "8/255")
    } | {f"raw:{a}@{e}" for a in ("pgd-20", "cw-inf") for e in ("0", "4/255", "8/255")}  # nested balls keep raw
    assert all(v.shape == (48,) and v.dtype == bool for v in flags.values())
    assert record["clean_accuracy"] == pytest.approx(flags["clean"].mean() * 100)
    assert all(c["passed"] for c in record["checks"]), record["checks"]
    ran_or_skipped = {c["name"] for c in record["checks"] + record["checks_skipped"]}
    assert ran_or_skipped >= {"square-probe", "more-steps", "ce-gradients-not-vanishing", "pgd20-cw-gap"}
    (line,) = out.output.strip().splitlines()  # --quiet: one line per target
    assert "checks passed" in line and "skipped (to run them: harness eval " in line and str(path) in line


def test_interrupted_eval_resumes_and_keeps_completed_cells(run_dir, data_dir):
    runner = CliRunner()
    args = eval_args(data_dir, str(run_dir), "--seed", "7")
    assert runner.invoke(main, args).exit_code == 0
    (path,) = [
        p for p in run_dir.glob("eval/last-*/evaluation.json") if json.loads(p.read_text())["config"]["seed"] == 7
    ]
    record = json.loads(path.read_text())
    # simulate an interruption before the last cell: drop it and mark the record running
    record["results"] = [
        r for r in record["results"] if (r["attack"], r["eps"]) != ("cw-inf", "8/255") and r["attack"] != "worst-case"
    ]
    record["status"] = "running"
    del record["sha256"]  # edited by hand: no longer sealed (a sealed record would fail its checksum)
    kept = {(r["attack"], r["eps"]): r["seconds"] for r in record["results"]}
    path.write_text(json.dumps(record))
    flags = load_flags(path.parent)
    del flags["cw-inf@8/255"]
    np.savez_compressed(path.parent / "flags.npz", **flags)

    out = runner.invoke(main, args)
    assert out.exit_code == 2 and "--resume" in out.output
    out = runner.invoke(main, args + ["--resume"])
    assert out.exit_code == 0, out.output
    record = json.loads(path.read_text())
    assert record["status"] == "complete"
    redone = {(r["attack"], r["eps"]): r["seconds"] for r in record["results"]}
    assert all(redone[k] == v for k, v in kept.items())  # completed cells were not recomputed
    assert ("cw-inf", "8/255") in redone
    assert "already evaluated" in runner.invoke(main, args).output


def one_line_error(args) -> str:
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.output
    return lines[0]


def test_unknown_attack(run_dir, data_dir):
    assert "did you mean 'cw-inf'" in one_line_error(["eval", str(run_dir), "-a", "cw-infinity"])


@pytest.mark.parametrize("eps", ["0,2", "-0.1", "8/255,abc"])
def test_eps_outside_unit_interval_or_malformed(run_dir, eps):
    assert "eps" in one_line_error(["eval", str(run_dir), "--eps", eps])


def test_state_dict_that_does_not_match_the_architecture(tmp_path, data_dir):
    path = tmp_path / "weights.pt"
    torch.save(build_model("small-cnn", DATASETS.get("synthetic")).state_dict(), path)
    line = one_line_error(
        ["eval", str(path), "--model", "small-cnn", "--dataset", "fashion-mnist", "--data-dir", str(data_dir)]
    )
    assert "does not match architecture small-cnn" in line and "features.0.weight" in line
    state = build_model("small-cnn", DATASETS.get("synthetic")).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["classifier.bias"]
    torch.save(state, path)
    line = one_line_error(["eval", str(path), "--model", "small-cnn", "--dataset", "synthetic"])
    assert "missing classifier.bias" in line and "unexpected extra.weight" in line


def test_state_dict_without_architecture(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({}, path)
    assert "--model" in one_line_error(["eval", str(path)])


def test_unknown_robustbench_name_suggests_close_ones():
    line = one_line_error(["eval", "robustbench:cifar10/Linf/Zhang2019Theoretcally"])
    assert "Zhang2019Theoretically" in line
    assert "choose from" in one_line_error(["eval", "robustbench:cifar11/Linf/Zhang2019Theoretically"])


def test_missing_robustbench_file_says_where_to_put_it(tmp_path):
    line = one_line_error(["eval", "robustbench:cifar10/Linf/Wong2020Fast", "--robustbench-dir", str(tmp_path)])
    assert str(tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt") in line


def test_robustbench_model_loads_through_robustbench_offline(tmp_path):
    """A checkpoint placed where the error says is loaded by robustbench's own loader (no network)."""
    from harness.evaluation.checkpoints import import_robustbench, load_checkpoint

    _, model_dicts, BenchmarkDataset, ThreatModel = import_robustbench()
    architecture = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]["Wong2020Fast"]["model"]()
    target = tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt"
    target.parent.mkdir(parents=True)
    torch.save(architecture.state_dict(), target)
    loaded = load_checkpoint(
        "robustbench:cifar10/Linf/Wong2020Fast", results_dir=tmp_path / "results", robustbench_dir=tmp_path
    )
    assert loaded.dataset == "cifar10" and loaded.checkpoint["label"] == "published"
    assert loaded.eval_root == tmp_path / "results" / "external" / "robustbench-cifar10-Linf-Wong2020Fast" / "eval"
    with torch.no_grad():
        assert loaded.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_checkpoint_of_another_architecture_revision_is_refused(run_dir, tmp_path):
    import shutil

    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "record.json").read_text())
    assert record["spec"]["model_revision"] >= 1
    record["spec"]["model_revision"] += 1
    del record["sha256"]  # edited by hand: unsealed
    (copy / "record.json").write_text(json.dumps(record))
    line = one_line_error(["eval", str(copy), "-a", "pgd-20"])
    assert f"revision {record['spec']['model_revision']}, but this code builds revision" in line
    assert record["environment"]["git"]["commit"][:12] in line


def test_summary_lists_skipped_checks_with_the_command_that_runs_them(run_dir, data_dir):
    args = ["eval", str(run_dir), "--n", "32", "-a", "pgd-20", "--eps", "0,8/255", "--data-dir", str(data_dir)]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    skipped = [line for line in out.output.splitlines() if line.strip().startswith("[skipped] pgd20-autoattack-gap")]
    assert skipped and f"run: harness eval {run_dir} --checkpoint last --n 32 --eps 0,8/255 " in skipped[0]
    assert f" --data-dir {data_dir} " in skipped[0] and skipped[0].endswith(" -a pgd-20 -a autoattack-standard")
    quiet = CliRunner().invoke(main, args + ["-q", str(run_dir)])
    lines = quiet.output.strip().splitlines()
    assert quiet.exit_code == 0 and len(lines) == 2 and all(line.startswith("already evaluated: ") for line in lines)


def wong_architecture():
    from harness.evaluation.checkpoints import import_robustbench

    _, model_dicts, BenchmarkDataset, ThreatModel = import_robustbench()
    return model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]["Wong2020Fast"]["model"]()


def wong_path(root):
    target = root / "cifar10" / "Linf" / "Wong2020Fast.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def test_robustbench_html_instead_of_weights_is_one_line(tmp_path):
    wong_path(tmp_path).write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>")
    line = one_line_error(["eval", "robustbench:cifar10/Linf/Wong2020Fast", "--robustbench-dir", str(tmp_path)])
    assert "HTML page, not weights" in line and "Wong2020Fast.pt" in line


def test_robustbench_legacy_checkpoint_with_extra_objects_loads(tmp_path):
    """An original training checkpoint: the weights plus an argparse Namespace and numpy values."""
    import argparse

    from harness.evaluation.checkpoints import load_checkpoint

    architecture = wong_architecture()
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in architecture.state_dict().items()},
            "args": argparse.Namespace(lr=0.1, epochs=15),
            "best_acc": np.float64(0.83),
            "epoch": np.int64(15),
        },
        wong_path(tmp_path),
    )
    loaded = load_checkpoint(
        "robustbench:cifar10/Linf/Wong2020Fast", results_dir=tmp_path / "r", robustbench_dir=tmp_path
    )
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), architecture.eval()(x), atol=1e-5)
    assert loaded.published_eps == Fraction(8, 255)


def test_robustbench_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    import functools

    torch.save(
        {"state_dict": wong_architecture().state_dict(), "hook": functools.partial(print, "pwned")}, wong_path(tmp_path)
    )
    line = one_line_error(["eval", "robustbench:cifar10/Linf/Wong2020Fast", "--robustbench-dir", str(tmp_path)])
    assert "functools.partial" in line and "refused" in line


def test_robustbench_truncated_checkpoint_is_one_line(tmp_path):
    buffer = __import__("io").BytesIO()
    torch.save(wong_architecture().state_dict(), buffer)
    wong_path(tmp_path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    line = one_line_error(["eval", "robustbench:cifar10/Linf/Wong2020Fast", "--robustbench-dir", str(tmp_path)])
    assert "Wong2020Fast.pt" in line and "download it again" in line


def test_missing_robustbench_file_hint_is_a_command_current_gdown_accepts(tmp_path):
    line = one_line_error(["eval", "robustbench:cifar10/Linf/Wong2020Fast", "--robustbench-dir", str(tmp_path)])
    assert "--id" not in line
    gid = line.split("`gdown ")[1].split(" ")[0]
    assert f"`gdown {gid} -O {tmp_path / 'cifar10' / 'Linf' / 'Wong2020Fast.pt'}`" in line


def test_published_eps_joins_the_default_sweep():
    from harness.core.datasets import DATASETS
    from harness.evaluation.checkpoints import RobustBenchName, published_eps
    from harness.evaluation.pipeline import sweep_eps

    zhang = published_eps(RobustBenchName("cifar10", "Linf", "Zhang2019Theoretically"))
    assert zhang == Fraction(31, 1000)
    cifar = DATASETS.get("cifar10").eps_sweep
    assert Fraction(31, 1000) in sweep_eps(None, cifar, zhang) and set(cifar) < set(sweep_eps(None, cifar, zhang))
    assert sweep_eps([Fraction(8, 255)], cifar, zhang) == [Fraction(8, 255)]  # --eps is taken as given


def test_plain_state_dict_with_a_namespace_loads(tmp_path, data_dir):
    import argparse

    from harness.evaluation.checkpoints import load_checkpoint

    path = tmp_path / "legacy.pt"
    state = build_model("small-cnn", DATASETS.get("synthetic")).state_dict()
    torch.save({"model": state, "args": argparse.Namespace(seed=1)}, path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(str(path), model_name="small-cnn", dataset="synthetic", results_dir=tmp_path)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
