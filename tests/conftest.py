"""Test-session set-up and the helpers that several test files share.

**PostgreSQL.** The PostgreSQL tests read ``WDSTUDY_TEST_PG_URL`` (:data:`PG_URL`). When it is
unset and nothing listens on 127.0.0.1:5432 (a fresh laptop), or when it is ``embedded``, a
throwaway server is started
from the ``pgserver`` wheel (a dev dependency: PostgreSQL's binaries in a pip package, a few
seconds to start) in a temporary folder, the variable is set to its URL for this process
and the processes it starts, and the server is stopped and removed at the end.

**Helpers.** Test files import them from here (``from .conftest import cli, write_spec``):
a small study spec (:func:`write_spec`), the CLI in a process of its own (:func:`cli`,
:func:`popen`), the study's journal (:func:`journal`), exact budgets (:func:`assert_exact`),
polling (:func:`wait_for`, :func:`running_trials`), an in-process worker (:func:`setup_study`,
:func:`quiet_worker`), the training run a fake wraps (:func:`real_training`) and datasets in
their on-disk formats (:func:`write_mnist_like`, :func:`write_cifar10`). Studies filled with
generated trials, without training, come from :mod:`wdstudy.synthetic`.

**Markers.** ``integration`` marks the tests that start processes (the CLI, workers,
PostgreSQL, Slurm, a pty) or otherwise take long; ``python -m pytest -q -m "not integration"``
runs the others in about a minute and a half on 2 idle cores (docs/how-to/tests.md).
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from wdstudy.analysis import evaluations_frame, progress_frame, trials_frame
from wdstudy.redact import redact
from wdstudy.storage import open_storage

_server = None
_folder = None
#: The PostgreSQL server of the PostgreSQL tests (set again once :func:`pytest_configure` has run).
PG_URL = os.environ.get("WDSTUDY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _listening(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def start_embedded_postgres() -> tuple[object, str, str]:
    """Start a throwaway PostgreSQL from the pgserver wheel: (server, URL, its folder)."""
    import pgserver

    folder = tempfile.mkdtemp(prefix="wdstudy-pg-")  # short: the server's socket lives in it
    server = pgserver.get_server(folder, cleanup_mode="stop")
    return server, server.get_uri(), folder


def pytest_configure(config):
    global _server, _folder, PG_URL
    wanted = os.environ.get("WDSTUDY_TEST_PG_URL")
    if wanted == "embedded" or (wanted is None and not _listening()):
        # started once, by pytest-xdist's controller (or the only process): its workers inherit the URL
        _server, url, _folder = start_embedded_postgres()
        os.environ["WDSTUDY_TEST_PG_URL"] = url
    PG_URL = os.environ.get("WDSTUDY_TEST_PG_URL", PG_URL)
    if not hasattr(config, "workerinput") and _listening_to(PG_URL):
        open_storage(PG_URL)  # Optuna's tables, before parallel tests could race to create them


def _listening_to(url: str) -> bool:
    import sqlalchemy

    try:
        sqlalchemy.create_engine(url).connect().close()
        return True
    except Exception:  # the tests that need it say so
        return False


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one test process per core, at most 4 (most tests start workers of their own)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_report_header(config):
    """Which PostgreSQL the PostgreSQL tests use, on the session's first lines."""
    if _server is not None:
        return f"postgresql: a throwaway server from the pgserver wheel, {PG_URL}"
    return f"postgresql: {redact(PG_URL)} (WDSTUDY_TEST_PG_URL, or the server on 127.0.0.1:5432)"


def pytest_unconfigure(config):
    if _server is not None:
        _server.cleanup()
        shutil.rmtree(_folder, ignore_errors=True)


# -- shared helpers ------------------------------------------------------------------------------


@contextmanager
def password_role():
    """A PostgreSQL role with a password on the tests' server: (its URL, its password). The role,
    and whatever it owns, is handed back and dropped at the end. (On a server with trust
    authentication the password is not checked; these tests are about where it is shown.)"""
    import sqlalchemy

    role, password = f"wd_{uuid.uuid4().hex[:8]}", f"Pw{uuid.uuid4().hex[:12]}"
    open_storage(PG_URL)  # Optuna's tables, if this is the first test on a fresh server, owned by its user
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"))
    # the tests' server (on 127.0.0.1:5432, or the throwaway one on its Unix socket) as that role
    url = sqlalchemy.engine.make_url(PG_URL).set(username=role, password=password).render_as_string(
        hide_password=False)
    try:
        yield url, password
    finally:
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f"REASSIGN OWNED BY {role} TO CURRENT_USER"))  # whatever it created
            c.execute(sqlalchemy.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


def pdf_text(path: Path) -> str:
    """A PDF's text and metadata (pypdf), to search for what must not be in it."""
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    meta = " ".join(str(v) for v in (reader.metadata or {}).values())
    return meta + "\n".join(page.extract_text() or "" for page in reader.pages)


def write_spec(tmp_path: Path, name: str = "tiny", **over) -> Path:
    spec = {
        "name": name,
        "tasks": [{"name": "mlp-mnist1d", "width": 16, "max_train": 400}],
        "task_defaults": {"epochs": 2},
        "optimizers": ["adam"],
        "regularizers": ["l2", "decoupled"],
        "search": {
            "lr": {"low": 1e-3, "high": 1e-2},
            "weight_decay": {"l2": {"low": 1e-5, "high": 1e-2}, "decoupled": {"low": 1e-2, "high": 10}},
            "sampler": "random",
            "trials": 3,
        },
        "evaluation": {"seeds": 2},
        "output": str(tmp_path / "out"),
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wdstudy", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wdstudy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def journal(tmp_path: Path):
    return open_storage(str((tmp_path / "out" / "optuna.journal").resolve()))


def assert_exact(storage, study: str, budget: int, seeds: int, cells: int) -> pd.DataFrame:
    prog = progress_frame(storage, study)
    assert len(prog) == cells
    for row in prog.itertuples():
        assert row.done == budget, prog
        assert row.running == 0 and row.waiting == 0, prog
        assert row.eval_done == row.eval_total, prog  # the pick's seeds, and every race survivor's
    ev = evaluations_frame(storage, study)
    assert (ev[ev.state == "COMPLETE"].groupby("cell").size() == seeds).all()
    every = evaluations_frame(storage, study, survivors=True)
    # each evaluated candidate (the pick, and any survivor) ran every seed exactly once
    assert (every[every.state == "COMPLETE"].groupby(["cell", "candidate"], dropna=False).size() == seeds).all()
    assert len(every[every["pick"]]) == len(ev)
    return prog


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def retries_of(df: pd.DataFrame, failed) -> pd.DataFrame:
    """The other attempts at a failed trial's slot: same cell, generation and slot."""
    return df[(df.cell == failed["cell"]) & (df.generation == failed["generation"]) & (df.slot == failed["slot"])
              & (df.trial != failed["trial"])]


def running_trials(tmp_path: Path, study: str) -> list:
    path = tmp_path / "out" / "optuna.journal"
    if not path.exists():
        return []
    df = trials_frame(open_storage(str(path.resolve())), study)
    # a trial is RUNNING as soon as it exists; wait until its worker has tagged it
    return [] if df.empty else df[(df.state == "RUNNING") & df.worker.notna()].to_dict("records")


def setup_study(tmp_path: Path, **over):
    """The spec of :func:`write_spec` (with ``over``) and its journal URL, its cell studies created."""
    from wdstudy.cells import ensure_studies
    from wdstudy.spec import load_spec

    spec = load_spec(write_spec(tmp_path, **over))
    url = str((tmp_path / "out" / "optuna.journal").resolve())
    ensure_studies(spec, open_storage(url))
    return spec, url


def quiet_worker(spec, url: str, train=None):
    """A worker in this process, polling fast and printing nothing; ``train`` replaces its training run."""
    from wdstudy.worker import Worker

    return Worker(spec, url, poll=0.05, log=lambda m: None, train=train)


def real_training(spec):
    """The training run a worker makes, as a function to wrap in a fake that fails some runs:
    the cell's task, optimizer and regularizer, the spec's schedule and ``decay_all``, on the CPU."""
    from wdstudy.train import train_run

    def train(cell, lr, wd, seed, callbacks, with_test):
        return train_run(cell.task, cell.optimizer, cell.regularizer, lr, wd, seed=seed, schedule=spec.schedule,
                         decay_all=spec.decay_all, with_test=with_test, callbacks=list(callbacks), accelerator="cpu")

    return train


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format of MNIST / FashionMNIST (big-endian header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, folder: str, n_train: int = 120, n_test: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 50, size=(n, 28, 28), dtype=np.uint8)
        x[np.arange(n), 2 * y + 3, 5:20] = 255  # a class-dependent stroke: learnable
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", x)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", y)
        out[prefix] = (x, y)
    return out


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0):
    """The python-pickle layout of CIFAR-10: five data batches, a test batch and the meta file."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = list(rng.integers(0, 10, size=n))
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        entry = {"batch_label": name, "labels": [int(v) for v in labels], "data": data,
                 "filenames": [f"img{i}.png" for i in range(n)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f, protocol=2)
    return written
