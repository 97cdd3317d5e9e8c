"""Checks a launch makes before it starts any work: the data is there, the output folder and the
storage can be written, the disk has room.

Each problem is a :class:`~wdstudy.errors.WdstudyError` of one line naming the field, the path (or
URL, its password hidden) and what is wrong, so ``launch`` exits 2 with nothing written, instead of
starting workers whose every trial fails (a missing data folder) or dying in a traceback when it
first writes (an output under a plain file, a read-only storage). No torch is imported here.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
import shutil
import struct
import tempfile
from pathlib import Path

from .errors import WdstudyError, one_line
from .tasks.names import DATASETS

#: Files a dataset read by torchvision needs under ``data_dir`` (torchvision's own on-disk layout).
_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATA_FILES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(f"MNIST/raw/{f}" for f in _IDX),
    "fashionmnist": tuple(f"FashionMNIST/raw/{f}" for f in _IDX),
    "cifar10": tuple(f"cifar-10-batches-py/{f}" for f in
                     ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")),
}
#: Datasets made here, from a fixed seed: no files, no network.
EMBEDDED = tuple(d for d in DATASETS if d not in DATA_FILES)

#: The free space a launch asks of the disk that holds its output (MB); WDSTUDY_MIN_FREE_MB overrides.
MIN_FREE_MB = 200


from .redact import redact  # noqa: E402,F401  (one redaction for the package: wdstudy.redact)


def check_data(spec, where: str | None = None) -> None:
    """Every built-in task whose dataset is read from files has a ``data_dir`` holding them.

    A task with ``download: true`` only needs a folder it can create (torchvision fetches the
    files then). A task named after a files dataset that has an embedded sibling with a similar
    name (``mlp-mnist`` for ``mlp-mnist1d``) is told about it: that is the usual slip.
    """
    prefix = f"{where}: " if where else ""
    for i, task in enumerate(spec.tasks):
        if task.is_user or task.dataset not in DATA_FILES:
            continue
        field = f"tasks.{i}.data_dir"
        hint = _embedded_hint(task.name)
        if task.data_dir is None:
            if task.download:
                raise WdstudyError(f"{prefix}{field}=None: download=true needs a folder to put {task.dataset!r} in")
            raise WdstudyError(f"{prefix}{field}=None: task {task.name!r} reads dataset {task.dataset!r} from files: "
                               f"set data_dir to the folder holding them (or download: true){hint}")
        root = Path(task.data_dir).expanduser()
        if task.download:
            writable(root, f"{prefix}{field}={task.data_dir!r}")
            continue
        missing = [f for f in DATA_FILES[task.dataset] if not (root / f).is_file()]
        if missing:
            what = "no such folder" if not root.is_dir() else \
                f"{len(missing)} of the {len(DATA_FILES[task.dataset])} files of {task.dataset!r} missing, e.g. {missing[0]}"
            raise WdstudyError(f"{prefix}{field}={task.data_dir!r}: {what} (or set download: true){hint}")
        if epochs_axis(spec):
            n = train_examples(task.dataset, root)
            n_train = n - int(round(n * task.val_fraction))  # as the loader splits it
            check_train_size(task, n_train if task.max_train is None else min(n_train, task.max_train),
                             f"{prefix}{field}={task.data_dir!r}")


def epochs_axis(spec) -> bool:
    """Whether an arm of ``spec`` is searched over its timescale in epochs (``axis: timescale_epochs``)."""
    return any((rng := spec.weight_decay_range(r)) is not None and rng.axis == "timescale_epochs"
               for r in spec.regularizers)


def train_examples(dataset: str, root: Path) -> int:
    """The training examples a files dataset's folder holds: the count in the MNIST-style label file's
    header, or the labels of CIFAR-10's five data batches."""
    if dataset in ("mnist", "fashionmnist"):
        with open(root / DATA_FILES[dataset][1], "rb") as f:  # train-labels-idx1-ubyte: magic, count, labels
            return struct.unpack(">I", f.read(8)[4:8])[0]
    total = 0
    for name in DATA_FILES[dataset]:
        if "data_batch" in name:
            with open(root / name, "rb") as f:
                total += len(pickle.load(f, encoding="latin1")["labels"])
    return total


def check_train_size(task, train: int, label: str) -> None:
    """A task searched over τ_epoch trains λ = 1/(η·τ_epoch·steps per epoch) with the steps per epoch
    its fields give (:attr:`~wdstudy.tasks.TaskConfig.train_size`, from the full training set for a
    files dataset): files whose training split holds another number of examples (``train``) would
    train another λ than the one stored, so the launch stops (a worker's run, for files it
    downloaded, fails) with both sizes instead. ``label`` names the file, key and value."""
    if train != task.train_size:
        raise WdstudyError(
            f"{label}: its training split holds {train} examples, but axis: timescale_epochs converts τ_epoch to λ "
            f"with the {task.train_size} of the full {task.dataset} training set ({task.steps_per_epoch} steps per "
            f"epoch); set max_train to at most {train}, or search axis: timescale (steps)")


def _embedded_hint(name: str) -> str:
    model, _, dataset = name.partition("-")
    close = difflib.get_close_matches(dataset, EMBEDDED, n=1, cutoff=0.7)
    return f"; did you mean {model}-{close[0]} (generated here, no files needed)?" if close else ""


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder of ``path`` (itself included) that exists; raises if a plain file is in the way."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(str(p))
    return p


def writable(folder: Path, label: str) -> Path:
    """Check that ``folder`` exists or can be created, and that files can be made in it; nothing is left behind.

    Returns the nearest existing folder (where the free space is measured)."""
    try:
        base = _existing_ancestor(folder)
    except NotADirectoryError as exc:
        raise WdstudyError(f"{label}: {exc} is a file, not a folder") from None
    try:  # a probe, removed at once: permission bits alone do not tell (root, read-only mounts, /proc)
        probe = tempfile.mkdtemp(prefix=".wdstudy-probe-", dir=base)
        os.rmdir(probe)
    except OSError as exc:
        raise WdstudyError(f"{label}: cannot write in {base} ({exc.strerror or exc})") from None
    return base


def check_output(spec) -> None:
    """The output folder can be created and written, and its disk has room."""
    out = spec.output_dir()
    label = f"output={str(out)!r}"
    if out.exists() and not out.is_dir():
        raise WdstudyError(f"{label}: is a file, not a folder")
    base = writable(out, label)
    need = int(os.environ.get("WDSTUDY_MIN_FREE_MB", MIN_FREE_MB))
    free = shutil.disk_usage(base).free // 2**20
    if free < need:
        raise WdstudyError(f"{label}: only {free} MB free on the disk of {base}; a study needs at least {need} MB "
                           "(set WDSTUDY_MIN_FREE_MB to change this)")


def check_storage(url: str) -> None:
    """The storage can be written: a journal file (or its folder) on this machine, or a database that answers."""
    if "://" not in url:
        path = Path(url)
        label = f"storage={url!r}"
        if path.is_dir():
            raise WdstudyError(f"{label}: is a folder; give the journal file, e.g. {path / 'optuna.journal'}")
        if path.exists():
            try:  # opened for appending, nothing written
                with open(path, "a"):
                    pass
            except OSError as exc:
                raise WdstudyError(f"{label}: cannot be written ({exc.strerror or exc})") from None
        else:
            writable(path.parent, label)
        return
    if url.startswith("sqlite:///"):
        check_storage(url[len("sqlite:///"):])
        return
    if not url.startswith(("postgresql://", "postgresql+")):
        raise WdstudyError(f"storage={redact(url)!r}: use postgresql://USER@HOST/DB (many machines), "
                           "sqlite:///PATH, or a journal file path (the default)")
    if url.startswith("postgresql"):
        try:
            import psycopg
        except ImportError:  # the storage itself will say what is missing
            return
        dsn = re.sub(r"^postgresql\+\w+://", "postgresql://", url)
        try:
            psycopg.connect(dsn, connect_timeout=10).close()
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the user's to fix
            first = one_line(exc, kind=False)
            raise WdstudyError(f"storage={redact(url)!r}: cannot connect ({redact(first)})") from None


def check_launch(spec, url: str, where: str | None = None) -> None:
    """Everything a launch (or a pool of workers) checks before it writes anything."""
    check_data(spec, where)
    check_output(spec)
    check_storage(url)
