"""The real loaders read small files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from harness.core.datasets import DATASETS, TensorLoader, crop_flip, load_split, read_idx, split_train_val
from harness.core.errors import HarnessError


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path, rng


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "b.idx.gz"):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_idx_rejects_other_formats(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(HarnessError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_reader_finds_files_in_data_dir(fashion_dir):
    data_dir, _ = fashion_dir
    split = load_split(DATASETS.get("fashion-mnist"), data_dir, train=True, download=False)
    assert split.images.shape == (50, 1, 28, 28) and split.images.dtype == torch.uint8
    assert split.labels.shape == (50,) and split.labels.dtype == torch.long
    test = load_split(DATASETS.get("fashion-mnist"), data_dir, train=False, download=False)
    assert len(test.labels) == 20


def test_cifar10_reader_reads_pickle_batches(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        expected.append((data, labels))
    split = load_split(DATASETS.get("cifar10"), tmp_path, train=True, download=False)
    assert split.images.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(split.images[:4].reshape(4, -1).numpy(), expected[0][0])
    assert split.labels[:4].tolist() == expected[0][1]
    test = load_split(DATASETS.get("cifar10"), tmp_path, train=False, download=False)
    assert test.labels.tolist() == expected[-1][1]


def test_cifar100_reader_uses_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name in ("train", "test"):
        with open(root / name, "wb") as f:
            pickle.dump(
                {"data": np.zeros((3, 3072), np.uint8), "fine_labels": [97, 5, 42], "coarse_labels": [1, 2, 3]}, f
            )
    split = load_split(DATASETS.get("cifar100"), tmp_path, train=True, download=False)
    assert split.labels.tolist() == [97, 5, 42]


def test_missing_cifar_names_the_file_to_place(tmp_path):
    with pytest.raises(HarnessError, match="cifar-10-batches-py"):
        load_split(DATASETS.get("cifar10"), tmp_path, train=True, download=False)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        load_split(DATASETS.get("synthetic"), tmp_path / "nope", train=True)


def test_synthetic_set_is_written_in_cifar_format(data_dir):
    split = load_split(DATASETS.get("synthetic"), data_dir, train=False)
    assert split.images.shape == (200, 3, 32, 32)
    assert set(split.labels.tolist()) <= set(range(10))


def test_validation_split_is_seeded_disjoint_and_subset_sized():
    train, val = split_train_val(100, 10, seed=3, train_subset=40)
    train2, val2 = split_train_val(100, 10, seed=3, train_subset=40)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert len(train) == 40 and len(val) == 10
    assert not set(train.tolist()) & set(val.tolist())
    other_train, other_val = split_train_val(100, 10, seed=4)
    assert not torch.equal(val, other_val) and len(other_train) == 90
    with pytest.raises(HarnessError):
        split_train_val(10, 10, seed=0)


def test_loader_epochs_are_reproducible_and_cover_the_data(data_dir):
    split = load_split(DATASETS.get("synthetic"), data_dir, train=True)
    indices = torch.arange(100)
    loader = TensorLoader(split, indices, 32, torch.device("cpu"), shuffle=True, augment=True, seed=7)
    first = list(loader.epoch(3))
    again = list(loader.epoch(3))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.index, b.index) for a, b in zip(first, again))
    seen = torch.cat([b.index for b in first])
    assert sorted(seen.tolist()) == list(range(100))
    assert not torch.equal(seen, torch.cat([b.index for b in loader.epoch(4)]))
    batch = first[0]
    assert batch.x.min() >= 0 and batch.x.max() <= 1 and batch.x.dtype == torch.float32
    assert torch.equal(batch.y, split.labels[batch.index])


def test_crop_flip_preserves_content_up_to_shift_and_flip():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8) + 1
    gen = torch.Generator().manual_seed(0)
    out = crop_flip(x, gen, pad=2)
    assert out.shape == x.shape
    for i in range(2):
        nonzero = out[i][out[i] > 0]
        assert set(nonzero.tolist()) <= set(x[i].flatten().tolist())
