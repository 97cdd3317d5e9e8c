"""Datasets held in memory as tensors, split deterministically, batched by slicing.

Every dataset here is small enough to live in memory (on the training device), so
batches are made by slicing a shuffled index rather than through per-sample
``Dataset.__getitem__`` calls and a collate function: for tiny models that path,
not the model, would dominate the run time.

* ``mnist1d``: generated locally by the ``mnist1d`` package with its default
  arguments (4000 train / 1000 test sequences of length 40, 10 classes). No network.
* ``curve1d``: a regression data set generated here from a fixed seed: noisy samples
  ``y = sin(2πx) + x/2 + ε`` (ε ~ N(0, 0.3²)) at x uniform in [0, 1], each x expanded into
  :data:`~.names.CURVE1D_FEATURES` fixed Gaussian RBF features (:func:`curve1d_features`).
  100 points to split into train and validation, 1000 test points. No network.
* ``mnist``, ``fashionmnist``, ``cifar10``: read through torchvision from
  ``data_dir`` in the datasets' own on-disk formats (``download=True`` fetches them
  with torchvision's checksummed downloader).

The validation split is carved out of the training data by a seeded permutation;
the test split is only loaded when asked for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import bad_value
from .names import CURVE1D_FEATURES, DATASETS, INPUT_SHAPES, NUM_CLASSES


@dataclass(frozen=True)
class Split:
    """Inputs and targets of one split: integer class labels, or real numbers for a regression."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class TaskData:
    """The train / validation (/ test) splits of one task. ``test`` is None unless asked for.

    A split is a :class:`Split` of tensors or, for a factory task's data that does not fit in
    memory, any ``torch.utils.data.Dataset`` of ``(x, y)`` examples, read through a
    ``DataLoader`` with ``num_workers`` worker processes (see :func:`batches`).
    """

    train: Split | Dataset
    val: Split | Dataset
    test: Split | Dataset | None = None
    num_workers: int = 0


# -- raw loaders: (x_train, y_train, x_test, y_test) as float / long tensors -------


@functools.lru_cache(maxsize=2)
def _mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    g = lambda a: torch.from_numpy(a).long()  # noqa: E731
    return f(d["x"]), g(d["y"]), f(d["x_test"]), g(d["y_test"])


# -- curve1d: a smooth curve, noisy samples, a fixed rich feature expansion ----------------------

CURVE1D_SEED = 0  #: the seed the curve1d data set is drawn from (like MNIST-1D's, fixed)
CURVE1D_NOISE = 0.3  #: standard deviation of the Gaussian noise on the targets
CURVE1D_POINTS = 100  #: points to split into train and validation (half each by default)
CURVE1D_TEST = 1000
CURVE1D_WIDTH = 1.0 / (CURVE1D_FEATURES - 1)  #: RBF width: the spacing of the centres


def curve1d_truth(x: Tensor) -> Tensor:
    """The smooth curve the samples are drawn around: ``sin(2πx) + x/2``."""
    return torch.sin(2 * math.pi * x) + 0.5 * x


def curve1d_features(x: Tensor) -> Tensor:
    """The fixed feature expansion of points ``x`` (shape ``(N,)``) into ``(N, CURVE1D_FEATURES)``:
    Gaussian bumps ``exp(-(x - c)² / 2w²)`` centred on an even grid ``c`` over [0, 1], ``w`` the grid
    spacing. Rich enough to follow the noise when weakly regularized; not learned."""
    centres = torch.linspace(0.0, 1.0, CURVE1D_FEATURES, dtype=x.dtype)
    return torch.exp(-0.5 * ((x.unsqueeze(-1) - centres) / CURVE1D_WIDTH) ** 2)


@functools.lru_cache(maxsize=4)
def curve1d_points(seed: int = CURVE1D_SEED) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, y, x_test, y_test)``: the raw points (before the feature expansion), drawn from
    ``seed`` alone. ``x``, ``y`` are the :data:`CURVE1D_POINTS` to split into train and
    validation; the test points are drawn after them, the same way."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(n, generator=g, dtype=torch.float64)
        y = curve1d_truth(x) + CURVE1D_NOISE * torch.randn(n, generator=g, dtype=torch.float64)
        return x.float(), y.float()

    x, y = draw(CURVE1D_POINTS)
    xt, yt = draw(CURVE1D_TEST)
    return x, y, xt, yt


def _torchvision(name: str, data_dir: str | None, download: bool, train: bool) -> tuple[Tensor, Tensor]:
    from torchvision import datasets

    if data_dir is None:
        raise bad_value("data_dir", None, f"dataset {name!r} is read from a folder: set data_dir (or download=true)")
    root = Path(data_dir).expanduser()
    if not download and not root.is_dir():
        raise bad_value("data_dir", str(root), f"no such folder for dataset {name!r} (and download is off)")
    cls = {"mnist": datasets.MNIST, "fashionmnist": datasets.FashionMNIST, "cifar10": _cifar10_class()}[name]
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:  # torchvision's "Dataset not found ..." messages
        raise bad_value("data_dir", str(root), f"dataset {name!r} not found there ({exc})") from None
    x = torch.as_tensor(ds.data)
    if x.ndim == 3:  # (N, H, W) grey images
        x = x.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C) numpy
        x = x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _cifar10_class():
    from torchvision.datasets import CIFAR10

    class CIFAR10Files(CIFAR10):
        """torchvision's CIFAR-10 that checks extracted batch files exist, not their MD5.

        The archive fetched by ``download=True`` is still verified against its MD5 by
        torchvision; only the per-file checks of already extracted batches are relaxed,
        so that subsets in the same format load too.
        """

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10Files


def _normalize_images(x_uint8: Tensor, ref: Tensor) -> Tensor:
    """Scale to [0, 1], then standardize per channel with statistics of ``ref`` (train only)."""
    x = x_uint8.float().div_(255.0)
    r = ref.float().div(255.0)
    mean = r.mean(dim=(0, 2, 3), keepdim=True)
    std = r.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def _split(n: int, val_fraction: float, seed: int, max_train: int | None) -> tuple[Tensor, Tensor]:
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    return (train_idx if max_train is None else train_idx[:max_train]), val_idx


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic ``(train_idx, val_idx)`` for ``n`` examples; the same on every machine."""
    n_val = int(round(n * val_fraction))
    if not 0 < n_val < n:
        raise bad_value("val_fraction", val_fraction, f"leaves no train or no validation examples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_data(
    dataset: str,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    with_test: bool = False,
    data_dir: str | None = None,
    download: bool = False,
    max_train: int | None = None,
) -> TaskData:
    """Load ``dataset`` into memory (CPU), split train into train / validation.

    ``max_train`` keeps only the first examples of the training split (after the
    validation split was carved out), for quick runs on large datasets.
    """
    if dataset not in DATASETS:
        raise bad_value("dataset", dataset, f"unknown; choose one of {', '.join(DATASETS)}")
    if dataset in ("mnist1d", "curve1d"):
        if dataset == "mnist1d":
            x_all, y_all, x_test, y_test = _mnist1d()
        else:
            x_raw, y_all, xt_raw, y_test = curve1d_points()
            x_all, x_test = curve1d_features(x_raw), curve1d_features(xt_raw)
        if not with_test:
            x_test = y_test = None
        train_idx, val_idx = _split(len(y_all), val_fraction, split_seed, max_train)
    else:
        x_raw, y_all = _torchvision(dataset, data_dir, download, train=True)
        train_idx, val_idx = _split(len(y_all), val_fraction, split_seed, max_train)
        ref = x_raw[train_idx]  # statistics of the training split only: validation is held out
        x_all = _normalize_images(x_raw, ref)
        x_test = y_test = None
        if with_test:
            xt_raw, y_test = _torchvision(dataset, data_dir, download, train=False)
            x_test = _normalize_images(xt_raw, ref)
    test = Split(x_test, y_test) if x_test is not None else None
    return TaskData(Split(x_all[train_idx], y_all[train_idx]), Split(x_all[val_idx], y_all[val_idx]), test)


class ShuffledBatches:
    """An iterable of ``(x, y)`` minibatches sliced from tensors, reshuffled every pass.

    The order of pass ``k`` depends only on ``(seed, k)``, not on any global RNG, so
    a run is reproducible whatever else draws random numbers. The permutation is
    made on the CPU and moved to the data's device once per pass.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise bad_value("batch_size", batch_size, "must be >= 1")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.passes = 0

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.split.x, self.split.y
        n, b = len(y), self.batch_size
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
            idx = torch.randperm(n, generator=g).to(y.device)
        self.passes += 1
        for i in range(len(self)):
            if self.shuffle:
                sel = idx[i * b : (i + 1) * b]
                yield x[sel], y[sel]
            else:
                yield x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]


def batches(split: Split | Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
            device: torch.device | str | None = None, num_workers: int = 0):
    """Minibatches of one split: sliced from tensors, or loaded from a Dataset.

    A :class:`Split` becomes :class:`ShuffledBatches` (moved to ``device`` first, when given).
    A ``Dataset`` goes through a ``DataLoader``: ``num_workers`` persistent worker processes,
    memory pinned when ``device`` is a GPU (so the copy to it can overlap), and a shuffle
    drawn from a generator seeded with ``seed``, so the order of every pass depends on the
    run's seed alone, as with tensors.
    """
    if isinstance(split, Split):
        return ShuffledBatches(split.to(device) if device is not None else split, batch_size, shuffle=shuffle, seed=seed)
    pin = device is not None and torch.device(device).type == "cuda"
    # The DataLoader draws its workers' base seed from `generator` once per iterator, which
    # persistent workers create once and others once per pass: a generator of its own keeps
    # both that draw and the shuffle (SeededShuffle) away from the RNG the model trains with.
    return DataLoader(split, batch_size=batch_size, sampler=SeededShuffle(len(split), seed) if shuffle else None,
                      num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class SeededShuffle(torch.utils.data.Sampler):
    """Indices ``0 … n-1`` in an order that depends only on ``(seed, pass)``, as :class:`ShuffledBatches`."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.passes = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
        self.passes += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


__all__ = [
    "batches",
    "curve1d_features",
    "curve1d_points",
    "curve1d_truth",
    "DATASETS",
    "INPUT_SHAPES",
    "NUM_CLASSES",
    "ShuffledBatches",
    "Split",
    "TaskData",
    "load_data",
    "split_indices",
]
