"""--precision and --compile: training (attack included) under autocast, fp16 loss scaling, fp32 evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import precision
from harness.defense import sgd_step
from harness.errors import HarnessError
from harness.runner import RunOptions, make_spec, run


def options(tmp_path, data_dir, **kw):
    return RunOptions(results_dir=tmp_path, data_dir=data_dir, device=torch.device("cpu"), progress=False, **kw)


@pytest.fixture
def output_dtypes(monkeypatch):
    """(training?, logits dtype) of every forward of the model the runner builds."""
    import harness.runner as runner

    seen: list[tuple[bool, torch.dtype]] = []
    build = runner.build_model

    def build_with_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        model.classifier.register_forward_hook(lambda m, i, out: seen.append((m.training, out.dtype)))
        return model

    monkeypatch.setattr(runner, "build_model", build_with_hook)
    return seen


def test_bf16_run_trains_in_bf16_evaluates_in_fp32_and_says_so(tmp_path, data_dir, output_dtypes):
    spec = make_spec("pgd-at", "synthetic", "smoke", precision_name="bf16")
    record = run(spec, options(tmp_path, data_dir))
    assert record["spec"]["precision"] == "bf16" and record["execution"]["precision"] == "bf16"
    assert record["execution"]["eval_precision"] == "fp32" and record["execution"]["compile"] is False
    assert spec.run_id != make_spec("pgd-at", "synthetic", "smoke").run_id  # never the same run as fp32
    train = {dtype for training, dtype in output_dtypes if training}
    evaluation = {dtype for training, dtype in output_dtypes if not training}
    assert train == {torch.bfloat16}  # train-mode attack steps and the training forward
    assert evaluation == {torch.float32}  # validation and test accuracy: plain fp32
    assert torch.isfinite(torch.tensor(record["epochs"][0]["train"]["loss"]))
    assert record["final"]["last"]["n"] == 64


def test_fp32_default_keeps_run_names_and_trains_in_fp32(tmp_path, data_dir):
    spec = make_spec("pgd-at", "synthetic", "smoke")
    assert "precision" not in spec.to_dict() or spec.precision == "fp32"
    with precision.scaling(precision.LossScaling("fp32", torch.device("cpu"))) as s:
        assert not s.enabled
    with precision.autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_compiled_run_is_recorded(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_COMPILE_BACKEND", "aot_eager")
    record = run(make_spec("pgd-at", "synthetic", "smoke", precision_name="bf16"),
                 options(tmp_path, data_dir, compile=True))
    assert record["execution"]["compile"] == "aot_eager"
    assert record["status"] == "complete" and torch.isfinite(torch.tensor(record["epochs"][0]["train"]["loss"]))


def test_fp16_scaler_scales_the_backward_and_skips_an_overflowing_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaling = precision.LossScaling("fp16", torch.device("cpu"))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    before, bias = model.weight.detach().clone(), model.bias.detach().clone()
    with precision.scaling(scaling):
        grads = []
        model.weight.register_hook(lambda g: grads.append(g.clone()))
        sgd_step(optimizer, F.cross_entropy(model(x), y))
    w = before.clone().requires_grad_(True)
    plain = torch.autograd.grad(F.cross_entropy(F.linear(x, w, bias), y), w)[0]
    assert torch.allclose(grads[0], plain * 65536.0, rtol=1e-4)  # the backward saw the scaled loss
    assert not torch.equal(model.weight, before)  # and the step used the unscaled gradient
    assert torch.allclose(model.weight, before - 0.1 * plain, atol=1e-6)
    scale = scaling.scale
    stuck = model.weight.detach().clone()
    with precision.scaling(scaling):
        sgd_step(optimizer, model(x).sum() * float("inf"))
    assert torch.equal(model.weight, stuck) and scaling.scale < scale  # overflow: no step, smaller scale


def test_unknown_precision_is_one_line_error():
    with pytest.raises(HarnessError, match="precision"):
        make_spec("pgd-at", "synthetic", "smoke", precision_name="fp8")
