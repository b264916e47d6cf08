"""Registry, eps parsing, records and the shared PGD."""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from harness.core.config import parse_eps
from harness.core.errors import DuplicateNameError, HarnessError, UnknownNameError
from harness.core.pgd import model_mode, pgd
from harness.core.registry import Registry
from harness.storage.atomic import write_json
from harness.storage.records import CorruptRecordError, iter_records, validate


def test_registry_duplicates_and_suggestions():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    with pytest.raises(DuplicateNameError):
        reg.add("alpha", 2)
    with pytest.raises(UnknownNameError, match="did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(UnknownNameError) as info:
        reg.get("zzzz")
    assert "did you mean" not in str(info.value) and "known: alpha" in str(info.value)


@pytest.mark.parametrize(
    "text, value", [("8/255", Fraction(8, 255)), ("0.031", Fraction(31, 1000)), ("0", Fraction(0)), ("1", Fraction(1))]
)
def test_eps_is_kept_exact(text, value):
    assert parse_eps(text) == value


@pytest.mark.parametrize("text", ["-1/255", "1.01", "abc", "1/0"])
def test_eps_rejects_bad_values(text):
    with pytest.raises(HarnessError):
        parse_eps(text)


def minimal_record(**changes):
    record = {
        "schema": 1,
        "run_id": "r",
        "status": "complete",
        "spec": {},
        "defense": {},
        "environment": {},
        "epochs": [{"train_seconds": 1.0}],
        "final": {},
        "checkpoints": {},
        "created": "now",
    }
    return record | changes


def test_record_validation_names_the_problem():
    validate(minimal_record())
    with pytest.raises(CorruptRecordError, match="missing field 'spec'"):
        validate({k: v for k, v in minimal_record().items() if k != "spec"})
    with pytest.raises(CorruptRecordError, match="status"):
        validate(minimal_record(status="half"))
    with pytest.raises(CorruptRecordError, match="epochs"):
        validate(minimal_record(epochs="many"))


def test_corrupt_records_are_named_and_skipped(tmp_path):
    write_json(tmp_path / "good" / "record.json", minimal_record())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "record.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = [rec["run_id"] for _, rec in iter_records(tmp_path)]
    assert found == ["r"]
    assert any("bad/record.json" in str(w.message) for w in caught)


def test_pgd_respects_per_sample_balls_box_and_leaves_model_alone(trained_model, train_batch):
    x, y = train_batch.x, train_batch.y
    eps = torch.linspace(0, 16 / 255, len(y))
    trained_model.train()
    before = {k: v.clone() for k, v in trained_model.state_dict().items()}
    x_adv = pgd(trained_model, x, y, eps, steps=5, step_size=eps / 4, mode="eval")
    linf = (x_adv - x).flatten(1).abs().max(1).values
    assert (linf <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert linf[0] == 0
    assert trained_model.training, "the model's mode must be restored"
    assert all(torch.equal(before[k], v) for k, v in trained_model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in trained_model.parameters())
    trained_model.eval()
    with torch.no_grad():
        assert F.cross_entropy(trained_model(x_adv), y) > F.cross_entropy(trained_model(x), y)


def test_pgd_train_mode_updates_batchnorm_statistics(synthetic_info, train_batch):
    from harness.core.models import build_model

    model = build_model("preact-resnet18", synthetic_info)
    stats = model.features[-4].running_mean.clone()
    pgd(model, train_batch.x[:4], train_batch.y[:4], 8 / 255, steps=1, step_size=2 / 255, mode="train")
    assert not torch.equal(stats, model.features[-4].running_mean)
    stats = model.features[-4].running_mean.clone()
    pgd(model, train_batch.x[:4], train_batch.y[:4], 8 / 255, steps=1, step_size=2 / 255, mode="eval")
    assert torch.equal(stats, model.features[-4].running_mean)


def test_model_mode_restores_mixed_flags(trained_model):
    trained_model.train()
    trained_model.classifier.eval()
    with model_mode(trained_model, "eval"):
        assert not any(m.training for m in trained_model.modules())
    assert trained_model.training and not trained_model.classifier.training


@pytest.mark.parametrize("name", ["small-cnn", "preact-resnet18", "wrn-28-4"])
def test_models_are_sized_by_dataset(name):
    from harness.core.datasets import DATASETS
    from harness.core.models import build_model

    for dataset in ("fashion-mnist", "cifar100"):
        info = DATASETS.get(dataset)
        model = build_model(name, info, dropout=0.1).eval()
        out = model(torch.rand(2, info.channels, info.image_size, info.image_size))
        assert out.shape == (2, info.num_classes)
