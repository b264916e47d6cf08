"""Data sets as in-memory uint8 tensors read from their real on-disk formats.

Pixels stay in [0, 1]; normalisation lives inside the model. Every data set is read by the same
code whether the files are the official ones or the small synthetic files the tests write, so the
loaders that users run are the loaders that are tested:

- CIFAR-10/100: the python pickle batches (`cifar-10-batches-py/`, `cifar-100-python/`). We read
  them ourselves because torchvision's class accepts only files with the official MD5 sums;
  torchvision is still used to download them when the network allows.
- Fashion-MNIST: the IDX files (gzipped or not), found in the data directory or where Debian's
  `dataset-fashion-mnist` package puts them.
- `synthetic`: a small, learnable 10-class problem written as CIFAR pickle batches on first use.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from harness.core.errors import HarnessError
from harness.core.registry import Registry
from harness.storage.atomic import atomic_write
from harness.storage.locks import hold, remove_stale_temps

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_DIR = Path(os.environ.get("HARNESS_DATA", Path.home() / ".cache" / "harness" / "data"))


class Split(NamedTuple):
    """Images as uint8 NCHW and integer labels."""

    images: torch.Tensor
    labels: torch.Tensor


Reader = Callable[[Path, bool, bool], Split]  # (data_dir, train, download) -> Split


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: Fraction  # the customary L-inf training and evaluation budget
    eval_step: Fraction  # PGD-20 step size of the evaluation convention
    eps_sweep: tuple[Fraction, ...]
    default_model: str
    augment: bool  # 4-pixel pad-crop + horizontal flip (CIFAR convention)
    reader: Reader


DATASETS: Registry[DatasetInfo] = Registry("data set")


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS.add(info.name, info)
    return info


def load_split(info: DatasetInfo, data_dir: Path | None, train: bool, download: bool = True) -> Split:
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if data_dir != DEFAULT_DATA_DIR and not data_dir.is_dir():
        raise HarnessError(f"data directory {data_dir} does not exist; create it or pass an existing --data-dir")
    split = info.reader(data_dir, train, download)
    expected = (info.channels, info.image_size, info.image_size)
    if split.images.dtype != torch.uint8 or tuple(split.images.shape[1:]) != expected:
        raise HarnessError(
            f"{info.name}: expected uint8 images of shape {expected}, got "
            f"{split.images.dtype} {tuple(split.images.shape[1:])}"
        )
    return split


# --------------------------------------------------------------------------- CIFAR pickle batches

# What a CIFAR batch pickle may reference: numpy's array and dtype reconstruction (numpy 1 and 2
# module paths, protocol-5 buffers) and the codec Python 2 pickles use for byte strings. A data
# set is data: a batch naming anything else (os.system, builtins.eval, ...) is refused unread.
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float


class _ForeignReference(pickle.UnpicklingError):
    """The pickle names a callable or class outside `_PICKLE_ALLOWED`."""


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise _ForeignReference(f"it references {module}.{name}")
        return super().find_class(module, name)


def _check_plain(value, path: Path, depth: int = 0) -> None:
    """Only dicts, lists, strings, bytes, numbers and numeric numpy arrays."""
    if depth > 4:
        raise HarnessError(f"{path}: refused: nested deeper than a CIFAR batch")
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise HarnessError(f"{path}: refused: numpy array of dtype {value.dtype} in a data batch")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, path, depth + 1)
            _check_plain(v, path, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, path, depth + 1)
    elif not isinstance(value, (str, bytes, int, float)) or value is None:
        raise HarnessError(f"{path}: refused: a data batch holds a {type(value).__name__}")


def _unpickle(path: Path) -> dict:
    """A CIFAR batch through a restricted unpickler: a crafted file cannot run code."""
    try:
        with open(path, "rb") as f:
            entry = _DataUnpickler(f, encoding="latin1").load()
    except _ForeignReference as exc:
        raise HarnessError(
            f"{path}: refused to load this data batch ({exc}); a CIFAR batch holds only "
            f"dicts, lists, strings, numbers and numeric numpy arrays"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise HarnessError(
            f"{path}: unreadable data batch ({type(exc).__name__}: {exc}); the file is truncated or corrupt: replace it"
        ) from None
    except OSError as exc:
        raise HarnessError(f"{path}: unreadable ({exc.strerror})") from None
    _check_plain(entry, path)
    if not isinstance(entry, dict):
        raise HarnessError(f"{path}: a CIFAR batch is a dict, this file holds a {type(entry).__name__}")
    return entry


def read_cifar_batches(paths: list[Path], label_key: str) -> Split:
    images, labels = [], []
    for path in paths:
        entry = _unpickle(path)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = [int(v) for v in entry[label_key]]
        except (KeyError, ValueError, TypeError) as exc:
            raise HarnessError(
                f"{path}: not a CIFAR batch (needs 'data' of N x 3072 bytes and "
                f"'{label_key}'): {type(exc).__name__} {exc}"
            ) from None
        if len(batch_labels) != len(data):
            raise HarnessError(f"{path}: {len(data)} images but {len(batch_labels)} labels")
        images.append(data)
        labels.extend(batch_labels)
    return Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long))


def _cifar_reader(folder: str, train_files: list[str], test_files: list[str], label_key: str, tv_class: str) -> Reader:
    def read(data_dir: Path, train: bool, download: bool) -> Split:
        root = data_dir / folder
        files = [root / f for f in (train_files if train else test_files)]
        if not all(f.exists() for f in files) and download:
            _torchvision_download(tv_class, data_dir)
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise HarnessError(
                f"{missing[0]} not found and could not be downloaded; place the "
                f"official python-pickle archive's '{folder}/' folder in {data_dir} "
                f"(or pass --data-dir)"
            )
        return read_cifar_batches(files, label_key)

    return read


def _torchvision_download(tv_class: str, data_dir: Path) -> None:
    import torchvision.datasets

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        getattr(torchvision.datasets, tv_class)(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # network errors come in many types; the caller reports what is missing
        print(f"download of {tv_class} failed: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- IDX (MNIST family)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian dims after a 4-byte magic."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    except (OSError, EOFError, struct.error, zlib.error) as exc:
        raise HarnessError(f"{path} is unreadable ({exc}); replace it") from None
    if zero != 0 or dtype_code != 0x08:
        raise HarnessError(f"{path} is not an unsigned-byte IDX file")
    try:
        dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (struct.error, ValueError) as exc:
        raise HarnessError(f"{path} is truncated or corrupt ({exc}); replace it") from None


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).exists():
                return d / name
    return None


def _fashion_mnist_reader(data_dir: Path, train: bool, download: bool) -> Split:
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    dirs = [data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", data_dir, DEBIAN_FASHION_MNIST]
    found = [_find_idx(dirs, s) for s in stems]
    if None in found and download:
        _torchvision_download("FashionMNIST", data_dir)
        found = [_find_idx(dirs, s) for s in stems]
    if None in found:
        raise HarnessError(
            f"Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` or "
            f"place {stems[0]}.gz and {stems[1]}.gz in {data_dir / 'fashion-mnist'}"
        )
    images = torch.from_numpy(read_idx(found[0]).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(found[1]).astype(np.int64))
    return Split(images, labels)


# --------------------------------------------------------------------------- synthetic

SYNTHETIC_SIZES = {"train": 2000, "test": 500}


def write_synthetic_cifar(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Write a learnable 10-class problem as CIFAR-10 pickle batches (one train, one test batch).

    Each class is a smooth random template; images are the template plus noise, so a small model
    learns it in seconds and is robust at eps = 8/255 (template contrast >> eps).
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, size=(10, 3, 4, 4))
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)  # 3x32x32 blocks

    def make(n: int) -> dict:
        labels = rng.integers(0, 10, size=n)
        x = 0.5 + 0.3 * templates[labels] + 0.1 * rng.standard_normal((n, 3, 32, 32))
        data = (np.clip(x, 0, 1) * 255).round().astype(np.uint8).reshape(n, -1)
        return {"data": data, "labels": labels.tolist()}

    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        atomic_write(root / name, functools.partial(pickle.dump, make(n)))


def _synthetic_reader(data_dir: Path, train: bool, download: bool) -> Split:
    root = data_dir / "synthetic-batches-py"
    if not (root / "test_batch").exists():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(
                f"cannot create {root} for the synthetic data ({exc.strerror}); pass a writable --data-dir"
            ) from None
        # Several runs may start on a fresh data directory at once: one writes, the others wait.
        with hold(root, what=f"data directory {root}", wait=True):
            remove_stale_temps(root)
            if not (root / "test_batch").exists():
                write_synthetic_cifar(root, SYNTHETIC_SIZES["train"], SYNTHETIC_SIZES["test"])
    return read_cifar_batches([root / ("data_batch_1" if train else "test_batch")], "labels")


# --------------------------------------------------------------------------- registrations

_CIFAR_SWEEP = tuple(Fraction(k, 255) for k in (0, 2, 4, 6, 8, 10, 12, 16))

register_dataset(
    DatasetInfo(
        name="cifar10",
        channels=3,
        image_size=32,
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2471, 0.2435, 0.2616),
        eps=Fraction(8, 255),
        eval_step=Fraction(2, 255),
        eps_sweep=_CIFAR_SWEEP,
        default_model="wrn-34-10",
        augment=True,
        reader=_cifar_reader(
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", "CIFAR10"
        ),
    )
)
register_dataset(
    DatasetInfo(
        name="cifar100",
        channels=3,
        image_size=32,
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        eps=Fraction(8, 255),
        eval_step=Fraction(2, 255),
        eps_sweep=_CIFAR_SWEEP,
        default_model="wrn-34-10",
        augment=True,
        reader=_cifar_reader("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"),
    )
)
register_dataset(
    DatasetInfo(
        name="fashion-mnist",
        channels=1,
        image_size=28,
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        # eps 0.1 is the usual Fashion-MNIST budget; the CIFAR sweep scaled by 0.1 / (8/255).
        eps=Fraction(1, 10),
        eval_step=Fraction(1, 40),
        eps_sweep=tuple(Fraction(k, 80) for k in (0, 2, 4, 6, 8, 10, 12, 16)),
        default_model="small-cnn",
        augment=False,
        reader=_fashion_mnist_reader,
    )
)
register_dataset(
    DatasetInfo(
        name="synthetic",
        channels=3,
        image_size=32,
        num_classes=10,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        eps=Fraction(8, 255),
        eval_step=Fraction(2, 255),
        eps_sweep=_CIFAR_SWEEP,
        default_model="small-cnn",
        augment=True,
        reader=_synthetic_reader,
    )
)


# --------------------------------------------------------------------------- batching


class Batch(NamedTuple):
    x: torch.Tensor  # float in [0, 1], NCHW, on the training device
    y: torch.Tensor
    index: torch.Tensor  # position in the training subset (0..n-1), for per-example defense state


def split_train_val(
    n: int, val_size: int, seed: int, train_subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded held-out validation split and a seeded training subset drawn from the rest.

    The split depends only on `seed` (not the run's seed), so every method and every run seed
    trains and selects on the same examples.
    """
    if val_size >= n:
        raise HarnessError(f"validation split of {val_size} leaves no training data (train set has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train = perm[val_size:] if train_subset is None else perm[val_size : val_size + train_subset]
    return train.sort().values, perm[:val_size].sort().values


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop after zero padding, and random horizontal flip (batched)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class TensorLoader:
    """Batches from an in-memory split; epoch `e` is a pure function of (seed, e), so resuming
    at an epoch boundary replays exactly the batches an uninterrupted run would have seen."""

    def __init__(
        self,
        split: Split,
        indices: torch.Tensor,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
    ):
        self.images = split.images[indices].to(device)
        self.labels = split.labels[indices].to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=gen).to(self.device) if self.shuffle else torch.arange(n, device=self.device)
        )
        for start in range(0, n, self.batch_size):
            take = order[start : start + self.batch_size]
            x = self.images[take].float().div_(255)
            if self.augment:
                x = crop_flip(x, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x, self.labels[take], take)
