"""Faults of the storage: a password kept secret, a torn or damaged journal, a full disk, a
database outage. Real launches, real files and a real PostgreSQL server (through a TCP proxy
the test cuts); nothing is mocked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy

from wdstudy.analysis import evaluations_frame, trials_frame
from wdstudy.redact import redact
from wdstudy.spec import load_spec
from wdstudy.storage import open_storage

from .conftest import PG_URL, assert_exact, journal, password_role, pdf_text, wait_for, write_spec
from .pgproxy import PgProxy

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WDSTUDY_STORAGE"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wdstudy", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or _env(), **kw)


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wdstudy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or _env())


def _drop(url: str, name: str) -> None:
    storage = open_storage(url)
    for s in storage.get_all_studies():
        if s.study_name.startswith(f"{name}/"):
            optuna.delete_study(study_name=s.study_name, storage=storage)


def _once_each(storage, study: str) -> None:
    """Every search slot and evaluation seed recorded exactly once (no double counting)."""
    df = trials_frame(storage, study)
    done = df[df.state.isin(["COMPLETE", "PRUNED"])]
    assert not done.duplicated(["cell", "generation", "slot"]).any(), done
    ev = evaluations_frame(storage, study)
    ok = ev[ev.state == "COMPLETE"]
    assert not ok.duplicated(["cell", "seed"]).any(), ok


# -- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql://alice:s3cret@db.example.org:5432/study",
    "postgresql+psycopg://alice:p%40ss%3Aw0rd@10.0.0.1/study?sslmode=require",
    "postgresql://alice@db/study",
    "sqlite:////tmp/x.db",
])
def test_redact_hides_the_password_as_sqlalchemy_does(url):
    ref = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    assert redact(url) == ref
    assert sqlalchemy.engine.make_url(redact(url)).password in (None, "***")


def test_redact_hides_a_password_given_as_a_query_parameter():
    shown = redact("postgresql://alice@db/study?password=hunter22&sslmode=require")
    assert "hunter22" not in shown and "password=***" in shown and "sslmode=require" in shown


@pytest.mark.integration
def test_a_password_never_reaches_an_output_a_file_or_a_command_line(tmp_path):
    """A study on a password-protected PostgreSQL role: launch, status, report, errors, logs,
    every file of the output (the PDF's text included), and the workers' command lines."""
    with password_role() as (url, password):
        role = sqlalchemy.engine.make_url(url).username
        _password_outputs(tmp_path, url, password, role)


def _password_outputs(tmp_path, url: str, password: str, role: str) -> None:
    shown_url = url.replace(f"{role}:{password}@", f"{role}:***@", 1)
    assert shown_url != url
    name = f"pw-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, name=name, search={"trials": 2}, evaluation={"seeds": 2})
    outputs = []
    cmdlines: list[str] = []
    try:
        launcher = start("launch", str(spec), "--storage", url, "--workers", "2")
        stop = threading.Event()

        def watch():  # the command lines of every process below the launcher
            while not stop.wait(0.2):
                for entry in Path("/proc").iterdir():
                    if entry.name.isdigit():
                        try:
                            cmdlines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
                        except OSError:
                            pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        out, err = launcher.communicate(timeout=600)
        stop.set()
        watcher.join()
        assert launcher.returncode == 0, err
        outputs += [out, err]
        assert f"storage {shown_url}" in out
        workers = [c for c in cmdlines if "wdstudy worker" in c]
        assert workers, "no worker command line was seen"
        assert not any(password in c for c in workers)
        # the other commands, the password kept off the command line with WDSTUDY_STORAGE
        env = _env(WDSTUDY_STORAGE=url)
        for args in (("status", str(spec)), ("report", str(spec))):
            r = run(*args, env=env)
            assert r.returncode == 0, r.stderr
            outputs += [r.stdout, r.stderr]
        assert "***" in outputs[-4]  # status names the storage, password hidden
        bad = run("status", str(spec), "--storage", f"postgresql://{role}:{password}@127.0.0.1:1/nodb")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert f"postgresql://{role}:***@127.0.0.1:1/nodb" in bad.stderr
        outputs += [bad.stdout, bad.stderr]
        from wdstudy.results import load_results

        os.environ["WDSTUDY_STORAGE"] = url
        try:
            results = load_results(study=name)
        finally:
            del os.environ["WDSTUDY_STORAGE"]
        assert password not in results.storage and len(results.trials) == 4
        texts = [t for t in outputs]
        files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
        assert any(p.suffix == ".pdf" for p in files) and any(p.name == "report.html" for p in files)
        for p in files:
            texts.append(p.read_bytes().decode("latin-1"))
            if p.suffix == ".pdf":
                texts.append(pdf_text(p))
        leaks = [t[:200] for t in texts if password in t]
        assert not leaks, leaks
        assert any(role in t for t in texts)  # the outputs do name the storage, with its user
    finally:
        _drop(PG_URL, name)

# -- the journal: torn tails, damaged records, two launches --------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study, run by two launches of one spec started a few seconds apart (a user who
    started it twice): both end well, with exact budgets."""
    tmp_path = tmp_path_factory.mktemp("twice")
    spec = write_spec(tmp_path, search={"trials": 4, "batch": 2})
    first = start("launch", str(spec), "--workers", "1", "--quiet")
    time.sleep(4)
    second = start("launch", str(spec), "--workers", "1", "--quiet")
    results = [p.communicate(timeout=600) for p in (first, second)]
    for p, (_out, err) in zip((first, second), results):
        assert p.returncode == 0, err
    return tmp_path, spec


@pytest.mark.integration
def test_two_launches_of_one_study_cooperate(finished):
    tmp_path, _ = finished
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=4, seeds=2, cells=2)
    _once_each(storage, "tiny")


@pytest.mark.integration
def test_every_table_of_a_study_without_pruning_failures_or_race_reads_with_pandas(finished):
    tmp_path, _ = finished
    out = tmp_path / "out"
    csvs, parquets = sorted(out.rglob("*.csv")), sorted(out.rglob("*.parquet"))
    assert {"pruning.csv", "importance.csv", "selection.csv", "trials.csv"} <= {p.name for p in csvs}
    for p in csvs:
        df = pd.read_csv(p)
        assert len(df.columns) > 0, p
    for p in parquets:
        pd.read_parquet(p)
    assert pd.read_csv(out / "tables" / "pruning.csv").empty  # nothing was pruned: a header only
    assert "cell" in pd.read_csv(out / "tables" / "pruning.csv").columns


def _copy_study(finished, tmp_path) -> tuple[Path, Path]:
    src, _ = finished
    spec = write_spec(tmp_path, search={"trials": 4, "batch": 2})
    (tmp_path / "out").mkdir()
    shutil.copy(src / "out" / "optuna.journal", tmp_path / "out" / "optuna.journal")
    return spec, tmp_path / "out" / "optuna.journal"


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


@pytest.mark.integration
def test_a_torn_last_record_of_a_finished_study_is_set_aside(finished, tmp_path):
    spec, path = _copy_study(finished, tmp_path)
    whole = path.read_bytes()
    before = trials_frame(open_storage(str(path)), "tiny")
    torn = _lines(path)[-1][:37]
    with open(path, "ab") as f:
        f.write(torn)
    r = run("status", str(spec))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "incomplete" in r.stderr
    assert path.read_bytes() == whole  # truncated to the last complete record
    (aside,) = path.parent.glob("optuna.journal.torn-*")
    assert aside.read_bytes() == torn
    r = run("report", str(spec))
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(trials_frame(open_storage(str(path)), "tiny"), before)


@pytest.mark.integration
def test_a_torn_write_in_a_half_finished_study_does_not_stop_its_relaunch(tmp_path):
    """The torn write is followed by more appends (a relaunch): the study completes with exact
    budgets and every trial recorded before the tear is intact."""
    from wdstudy.cells import ensure_studies
    from wdstudy.spec import load_spec
    from wdstudy.worker import Worker

    spec_path = write_spec(tmp_path, search={"trials": 4, "batch": 2}, evaluation={"seeds": 1})
    spec = load_spec(spec_path)
    url = str((tmp_path / "out" / "optuna.journal").resolve())
    ensure_studies(spec, open_storage(url))
    Worker(spec, url, poll=0.05, log=lambda m: None).run(max_units=3)
    before = trials_frame(open_storage(url), "tiny")
    before = before[before.state == "COMPLETE"].set_index(["cell", "trial"])
    assert len(before) == 3
    path = Path(url)
    with open(path, "ab") as f:  # half of a record, as a full disk or a crash leaves it
        f.write(_lines(path)[-1][: len(_lines(path)[-1]) // 2])
    r = run("launch", str(spec_path), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "incomplete" in r.stderr
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=4, seeds=1, cells=2)
    after = trials_frame(storage, "tiny").set_index(["cell", "trial"])
    pd.testing.assert_frame_equal(after.loc[before.index, ["value", "lr", "weight_decay", "state"]],
                                  before[["value", "lr", "weight_decay", "state"]])
    assert len(list(path.parent.glob("optuna.journal.torn-*"))) == 1


@pytest.mark.integration
def test_a_damaged_middle_record_is_one_line_and_repair_recovers_the_rest(finished, tmp_path):
    spec, path = _copy_study(finished, tmp_path)
    lines = _lines(path)
    reference = trials_frame(open_storage(str(path)), "tiny")
    # a torn write followed by the next writer's record on the same line (what an older version left)
    k = len(lines) // 2
    damaged = lines[:k] + [lines[k][:25] + lines[k + 1]] + lines[k + 2:]
    lines_kept = lines[:k] + lines[k + 1:]
    path.write_bytes(b"\n".join(damaged) + b"\n")
    offset = sum(len(x) + 1 for x in lines[:k])
    r = run("status", str(spec))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and f"byte {offset}" in r.stderr and "wdstudy repair" in r.stderr
    r = run("repair", str(spec), input="n\n")
    assert r.returncode == 1 and path.read_bytes() == b"\n".join(damaged) + b"\n"  # declined: nothing changed
    r = run("repair", str(spec), "--yes")
    assert r.returncode == 0, r.stderr
    assert path.read_bytes() == b"\n".join(lines_kept) + b"\n"  # every complete record, the torn bytes aside
    (aside,) = path.parent.glob("optuna.journal.torn-*")
    assert aside.read_bytes() == lines[k][:25]
    # here the record the torn one was cut from (line k) was lost with it: the study reads again
    # with that one change, and a relaunch completes it with exact budgets
    r = run("launch", str(spec), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert_exact(journal(tmp_path), "tiny", budget=4, seeds=2, cells=2)
    assert len(reference) >= 8


@pytest.mark.integration
def test_a_corrupt_record_in_the_middle_is_set_aside_alone(finished, tmp_path):
    """A record that does not decode (bytes overwritten): repair keeps every other record."""
    spec, path = _copy_study(finished, tmp_path)
    lines = _lines(path)
    # an attribute write (a lease renewal or a user attribute), whose loss changes no trial's existence
    k = next(i for i in range(len(lines) // 2, len(lines)) if b'"op_code":8' in lines[i] or b'"op_code":9' in lines[i])
    damaged = lines[:k] + [b"\x00" * 10 + lines[k][10:]] + lines[k + 1:]
    path.write_bytes(b"\n".join(damaged) + b"\n")
    r = run("status", str(spec))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "is damaged" in r.stderr
    r = run("repair", str(spec), "--yes")
    assert r.returncode == 0, r.stderr
    assert path.read_bytes() == b"\n".join(lines[:k] + lines[k + 1:]) + b"\n"
    r = run("status", str(spec))
    assert r.returncode == 0 and "4/4" in r.stdout, r.stdout + r.stderr


# -- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    # room for the study's start and the journal's disk reserve (RESERVE_BYTES), not for the study
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=144k", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"a tmpfs is needed (as root, as in CI): {r.stderr}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.integration
def test_a_full_disk_stops_the_launch_cleanly_and_the_same_command_resumes(tmp_path, small_disk):
    spec = write_spec(tmp_path, search={"trials": 12, "batch": 4}, task_defaults={"epochs": 1},
                      evaluation={"seeds": 2}, output=str(small_disk / "out"))
    # the pre-launch check wants 200 MB free (it would refuse this disk at once); the point here is a
    # disk that fills up during the study
    env = _env(WDSTUDY_MIN_FREE_MB="0")
    r = run("launch", str(spec), "--workers", "2", "--quiet", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("wdstudy: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(small_disk) in errors[0], r.stderr
    url = str(small_disk / "out" / "optuna.journal")
    done = trials_frame(open_storage(url), "tiny")
    assert 0 < (done.state == "COMPLETE").sum() < 24  # it stopped mid-study
    # the units running at the stop were failed with the full disk's reason (in the room the disk
    # reserve left, if they needed it): none is RUNNING
    stopped = _trials(open_storage(url), "tiny")
    FAIL, RUNNING = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING
    logs = {q.name: q.read_text(errors="replace")[-2000:] for q in (small_disk / "out" / "logs").glob("*.log")}
    assert not [k for k, (state, *_) in stopped.items() if state == RUNNING], (stopped, r.stderr, logs)
    failed = [(kind, why) for state, _, kind, why in stopped.values() if state == FAIL]
    assert failed and all(kind == "storage" for kind, _ in failed), failed
    assert any(f"cannot write {url}: No space left on device" in why for _, why in failed), failed
    reserve = Path(f"{url}.wdstudy-reserve")  # spent on those failure records, unless they fit without it
    for log in (small_disk / "out" / "logs").glob("worker-*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = run("launch", str(spec), "--workers", "2", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    from wdstudy.journal import RESERVE_BYTES

    assert reserve.stat().st_size == RESERVE_BYTES  # made whole again, now that the disk has room
    storage = open_storage(url)
    assert_exact(storage, "tiny", budget=12, seeds=2, cells=2)
    _once_each(storage, "tiny")
    kept = trials_frame(storage, "tiny").set_index(["cell", "trial"])
    first = done[done.state == "COMPLETE"].set_index(["cell", "trial"])
    assert (kept.loc[first.index, "value"] == first.value).all()  # nothing stored before the stop was lost
    finished = {k: v for k, v in stopped.items() if v[0].is_finished()}  # and the failed ones stay as they were
    assert finished and finished.items() <= _trials(storage, "tiny").items()
    # the evaluation seeds are the spec's, and the stopped units re-ran with their own parameters
    ev = evaluations_frame(storage, "tiny")
    assert sorted(ev[ev.state == "COMPLETE"].seed.astype(int)) == sorted(2 * load_spec(spec).evaluation.seed_list())
    assert not [t.number for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)
                if t.user_attrs.get("variant")]


def _trials(storage, study: str) -> dict:
    """Every trial of every phase study of ``study``: (state, values, fail kind, fail reason) by
    (phase study, trial number)."""
    return {(s.study_name, t.number): (t.state, t.values, t.system_attrs.get("fail_kind"),
                                       t.system_attrs.get("fail_reason"))
            for s in storage.get_all_studies() if s.study_name.startswith(f"{study}/")
            for t in storage.get_all_trials(s._study_id, deepcopy=False)}


# -- a database outage -------------------------------------------------------------------------------


def _tell_commit(state: dict, data: bytes) -> bool:
    """The COMMIT of a finished trial's tell: it reaches the server, its answer does not."""
    if b"UPDATE trials SET state" in data and b"COMPLETE" in data:
        state["tell"] = True
        return False
    return bool(state.get("tell")) and b"COMMIT" in data


def _reservation(state: dict, data: bytes) -> bool:
    """A worker inside a reservation: taking a waiting trial (RUNNING), mid-transaction."""
    return b"UPDATE trials SET state" in data and b"RUNNING" in data


def _tell_update(state: dict, data: bytes) -> bool:
    """The UPDATE of a tell, before its COMMIT: the server rolls it back."""
    return b"UPDATE trials SET state" in data and b"COMPLETE" in data


@pytest.mark.parametrize("cut", [_tell_commit, _tell_update])
@pytest.mark.integration
def test_a_tell_cut_off_by_a_lost_connection_is_recorded_once(cut):
    """Whether the commit reached the server (its answer lost) or not, the retried tell ends
    with the trial COMPLETE once, with its value; plain Optuna raises."""
    proxy = PgProxy()
    name = f"tell-{uuid.uuid4().hex[:8]}"
    try:
        storage = open_storage(proxy.url())
        study = optuna.create_study(study_name=name, storage=storage)
        trial = study.ask()
        proxy.arm(cut, 1.5)
        frozen = study.tell(trial, 0.25)
        assert proxy.armed == 0 and len(proxy.cuts) == 1
        assert frozen.state == optuna.trial.TrialState.COMPLETE and frozen.value == 0.25
        trials = optuna.load_study(study_name=name, storage=open_storage(PG_URL)).trials
        assert [(t.state, t.value) for t in trials] == [(optuna.trial.TrialState.COMPLETE, 0.25)]
        # the same cut under Optuna's own storage: the tell fails
        raw = optuna.storages.RDBStorage(proxy.url())
        plain = optuna.load_study(study_name=name, storage=raw)
        second = plain.ask()
        proxy.arm(cut, 1.5)
        with pytest.raises(Exception):
            plain.tell(second, 0.5)
    finally:
        proxy.close()
        optuna.delete_study(study_name=name, storage=open_storage(PG_URL))


def _queuing_commit(n: int):
    """The COMMIT of the ``n``-th trial queued WAITING (counted over every connection): it reaches
    the server, its answer does not."""
    seen = {"queued": 0}

    def match(state: dict, data: bytes) -> bool:
        if b"UPDATE trials SET state" in data and b"WAITING" in data:  # a trial is created, then set WAITING
            seen["queued"] += 1
            state["queued"] = seen["queued"]
            return False
        return state.get("queued") == n and b"COMMIT" in data

    return match


@pytest.mark.parametrize("n, fails", [(1, 0), (3, 1), (3, 0)], ids=["search-slot", "requeued-slot", "eval-seed"])
@pytest.mark.integration
def test_a_unit_queued_twice_across_a_lost_connection_runs_once(tmp_path, n, fails):
    """The creation of a queued trial reaches the database but its answer is lost: a search slot
    of the first generation, a failed slot's re-queued attempt, an evaluation seed. Optuna's RDB
    storage creates the trial a second time by itself; the copy is ended unrun, and the budget
    stays exact: each slot and seed complete once."""
    from types import SimpleNamespace

    from wdstudy.cells import ensure_studies
    from wdstudy.spec import load_spec
    from wdstudy.worker import Worker

    proxy = PgProxy()
    name = f"dup-{uuid.uuid4().hex[:8]}"
    spec = load_spec(write_spec(tmp_path, name=name, regularizers=["decoupled"],
                                search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2, "batch": 2},
                                evaluation={"seeds": 2}))
    calls = {"n": 0}

    def train(cell, lr, wd, seed, callbacks, with_test):
        calls["n"] += 1
        if calls["n"] <= fails:
            raise RuntimeError("a run that raised (simulated)")
        return SimpleNamespace(metrics={spec.search.objective: lr, "val_error": lr, "test_error": lr}, history=[])

    try:
        ensure_studies(spec, open_storage(proxy.url()))
        proxy.arm(_queuing_commit(n), 0.0)
        Worker(spec, proxy.url(), poll=0.05, log=lambda m: None, train=train).run()
        assert proxy.armed == 0 and len(proxy.cuts) == 1
        storage = open_storage(PG_URL)
        prog = assert_exact(storage, name, budget=2, seeds=2, cells=1)
        assert list(prog.fail) == [fails]  # the copy is no failed run
        _once_each(storage, name)
        copies = [t for s in storage.get_all_studies() if s.study_name.startswith(f"{name}/")
                  for t in storage.get_all_trials(s._study_id) if t.system_attrs.get("fail_kind") == "duplicate"]
        assert len(copies) == 1 and copies[0].datetime_start is None  # queued twice, the copy never ran
    finally:
        proxy.close()
        _drop(PG_URL, name)


def _reservation_commit(state: dict, data: bytes) -> bool:
    """The COMMIT of a reservation (a waiting trial set RUNNING): it reaches the server, its answer does not."""
    if _reservation(state, data):
        state["take"] = True
        return False
    return bool(state.get("take")) and b"COMMIT" in data


@pytest.mark.integration
def test_a_reservation_whose_answer_is_lost_is_failed_as_lost_and_run_once(tmp_path, monkeypatch):
    """The worker's block is run again and takes another unit; the trial it had set RUNNING, untagged,
    is failed as lost once its lease (from its start, or the outage's end) expires, and re-queued:
    the budget stays exact."""
    from types import SimpleNamespace

    from wdstudy.cells import ensure_studies
    from wdstudy.spec import load_spec
    from wdstudy.worker import Worker

    monkeypatch.setattr("wdstudy.storage.GRACE_PERIOD", 2.0)
    proxy = PgProxy()
    name = f"take-{uuid.uuid4().hex[:8]}"
    spec = load_spec(write_spec(tmp_path, name=name, regularizers=["decoupled"],
                                search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2, "batch": 2},
                                evaluation={"seeds": 1}))

    def train(cell, lr, wd, seed, callbacks, with_test):
        return SimpleNamespace(metrics={spec.search.objective: lr, "val_error": lr, "test_error": lr}, history=[])

    try:
        ensure_studies(spec, open_storage(proxy.url()))
        proxy.arm(_reservation_commit, 0.0)
        Worker(spec, proxy.url(), poll=0.05, log=lambda m: None, train=train).run()
        assert proxy.armed == 0 and len(proxy.cuts) == 1
        storage = open_storage(PG_URL)
        prog = assert_exact(storage, name, budget=2, seeds=1, cells=1)
        assert list(prog.fail) == [1]
        _once_each(storage, name)
        failed = trials_frame(storage, name).query("state == 'FAIL'")
        assert list(failed.fail_kind) == ["lost"] and failed.worker.isna().all()  # never run
    finally:
        proxy.close()
        _drop(PG_URL, name)


@pytest.mark.integration
def test_a_pruned_search_trains_on_through_an_outage_and_reports_when_the_storage_is_back(monkeypatch):
    """With a pruner, each epoch asks the storage; while it is unreachable, the epoch's report is
    skipped at once (one log line) instead of pausing the run for the outage window."""
    from types import SimpleNamespace

    import torch

    from wdstudy.worker import pruning_callback

    monkeypatch.setenv("WDSTUDY_STORAGE_OUTAGE", "120")
    proxy = PgProxy()
    name = f"prune-{uuid.uuid4().hex[:8]}"
    logged: list[str] = []
    try:
        study = optuna.create_study(study_name=name, storage=open_storage(proxy.url()))
        trial = study.ask()
        callback = pruning_callback(trial, "val_error", logged.append)
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val_error": torch.tensor(0.4)})
        proxy.cut(30)
        start = time.monotonic()
        for epoch in (0, 1):
            callback.on_validation_end(trainer, SimpleNamespace(current_epoch=epoch))
        assert time.monotonic() - start < 10, "the run waited for the storage"
        assert callback.skipped == 2 and len(logged) == 1 and "unreachable" in logged[0]
        proxy.down_until = 0  # the database is back
        callback.on_validation_end(trainer, SimpleNamespace(current_epoch=2))
        stored = optuna.load_study(study_name=name, storage=open_storage(PG_URL)).trials[0]
        assert stored.intermediate_values == {2: pytest.approx(0.4)}
    finally:
        proxy.close()
        optuna.delete_study(study_name=name, storage=open_storage(PG_URL))


def _pg_spec(tmp_path, name):
    return write_spec(tmp_path, name=name, search={"trials": 8, "batch": 2}, task_defaults={"epochs": 2},
                      evaluation={"seeds": 2})


def _logs(tmp_path) -> str:
    return "".join(p.read_text(errors="replace") for p in (tmp_path / "out" / "logs").glob("*.log"))


@pytest.mark.integration
def test_a_database_outage_is_a_pause(tmp_path):
    """Every connection dropped twice during a 2-worker launch, a few seconds each: once inside
    a reservation, once as a worker records a finished trial (its commit reaches the server,
    the answer does not). The launch ends well, each trial recorded once."""
    proxy = PgProxy()
    name = f"outage-{uuid.uuid4().hex[:8]}"
    spec = _pg_spec(tmp_path, name)
    env = _env(WDSTUDY_STORAGE=proxy.url(), WDSTUDY_STORAGE_OUTAGE="120", WDSTUDY_GRACE_PERIOD="8",
               WDSTUDY_LEASE_INTERVAL="1")
    try:
        launcher = start("launch", str(spec), "--workers", "2", "--quiet", env=env)
        time.sleep(8)  # the workers are at work
        proxy.arm(_reservation, 3.0)
        wait_for(lambda: proxy.armed == 0 or launcher.poll() is not None, 300, "a reservation")
        time.sleep(2)
        proxy.arm(_tell_commit, 3.0)
        out, err = launcher.communicate(timeout=900)
        assert proxy.armed == 0 and len(proxy.cuts) == 2, "the study ended before both cuts; make it longer"
        assert launcher.returncode == 0, err
        assert "Traceback" not in err and "Traceback" not in _logs(tmp_path), err
        logs = _logs(tmp_path)
        assert "unreachable" in logs and "reachable again" in logs
        storage = open_storage(PG_URL)
        assert_exact(storage, name, budget=8, seeds=2, cells=2)
        _once_each(storage, name)
    finally:
        proxy.close()
        _drop(PG_URL, name)


@pytest.mark.integration
def test_an_outage_longer_than_the_window_stops_cleanly_and_a_relaunch_completes(tmp_path):
    proxy = PgProxy()
    name = f"outage-{uuid.uuid4().hex[:8]}"
    spec = _pg_spec(tmp_path, name)
    env = _env(WDSTUDY_STORAGE=proxy.url(password="Secr3tPw"), WDSTUDY_STORAGE_OUTAGE="4",
               WDSTUDY_LEASE_INTERVAL="1")
    try:
        launcher = start("launch", str(spec), "--workers", "2", "--quiet", env=env)
        storage = open_storage(PG_URL)
        wait_for(lambda: (lambda df: not df.empty and (df.state == "COMPLETE").any())(trials_frame(storage, name)),
                 300, "a finished trial")
        cut_at = time.monotonic()
        proxy.cut(600)
        out, err = launcher.communicate(timeout=300)
        took = time.monotonic() - cut_at
        assert launcher.returncode == 1, out + err
        assert "Traceback" not in err and "Secr3tPw" not in err + out + _logs(tmp_path), err
        errors = [ln for ln in err.splitlines() if ln.startswith("wdstudy: error:")]
        assert len(errors) == 1, err
        assert re.search(re.escape(f"storage postgresql://{proxy.user}:***@127.0.0.1:") + r"\d+"
                         + re.escape(f"/{proxy.db} unreachable for ") + r"\d+ s", errors[0]), errors[0]
        assert took < 120, took
        proxy.down_until = 0  # the database is back
        r = run("launch", str(spec), "--workers", "2", "--quiet", env=env)
        assert r.returncode == 0, r.stderr
        assert_exact(storage, name, budget=8, seeds=2, cells=2)
        _once_each(storage, name)
    finally:
        proxy.close()
        _drop(PG_URL, name)


@pytest.mark.integration
def test_two_restarts_of_the_postgresql_server_are_pauses(tmp_path):
    """The server itself (a throwaway one from pgserver) restarted twice in the middle of a
    2-worker study: exit 0, exact budgets, each trial recorded once."""
    import pgserver
    from pgserver._commands import pg_ctl

    # its folder outside pytest's: the server runs as another user, and a pytest session started
    # meanwhile on the same machine makes /tmp/pytest-of-USER private again (the restart then fails)
    folder = tempfile.mkdtemp(prefix="wdstudy-pg-")
    srv = pgserver.get_server(folder, cleanup_mode="stop")
    url = srv.get_uri("postgres")
    name = f"restart-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, name=name, search={"trials": 8, "batch": 2}, task_defaults={"epochs": 3},
                      evaluation={"seeds": 2})
    try:
        launcher = start("launch", str(spec), "--workers", "2", "--quiet", env=_env(WDSTUDY_STORAGE=url))
        storage = open_storage(url)
        restarts = 0
        for target in (2, 6):  # finished search trials before each restart
            wait_for(lambda: launcher.poll() is not None or (lambda df: not df.empty and (df.state == "COMPLETE").sum()
                                                             >= target)(trials_frame(storage, name)),  # noqa: B023
                     900, "trials")
            if launcher.poll() is None:
                pg_ctl(["-w", "-m", "fast", "restart"], pgdata=srv.pgdata, user=srv.system_user, timeout=60)
                restarts += 1
        out, err = launcher.communicate(timeout=900)
        assert restarts == 2, "the study ended before both restarts; make it longer"
        assert launcher.returncode == 0, err
        assert "Traceback" not in err and "Traceback" not in _logs(tmp_path)
        storage = open_storage(url)
        assert_exact(storage, name, budget=8, seeds=2, cells=2)
        _once_each(storage, name)
    finally:
        srv.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_network_file_systems_hiccup_is_an_outage_and_a_full_disk_is_not(tmp_path, monkeypatch):
    """A journal on NFS: EIO and ESTALE are waited out like a lost database connection (the append
    is retried, here after two failures); ENOSPC stops at once as the full-disk case."""
    import errno

    from wdstudy.outage import classify, retry_block

    assert classify(OSError(errno.ESTALE, "Stale file handle")) == "transient"
    assert classify(OSError(errno.EIO, "Input/output error")) == "transient"
    assert classify(OSError(errno.ENOSPC, "No space left on device")) == "unwritable"
    assert classify(OSError(errno.ENOENT, "No such file")) is None
    monkeypatch.setenv("WDSTUDY_STORAGE_OUTAGE", "60")
    monkeypatch.setattr("wdstudy.outage._backoff", lambda attempt: 0.01)
    calls, lines = [], []

    def append():
        calls.append(1)
        if len(calls) <= 2:
            raise OSError(errno.ESTALE, "Stale file handle")
        return "appended"

    assert retry_block(append, str(tmp_path / "optuna.journal"), log=lines.append) == "appended"
    assert len(calls) == 3 and any("unreachable" in ln for ln in lines) and any("again" in ln for ln in lines)


# -- a full disk, in this process: the disk reserve, the retries, the run's own files ----------------


def _fake_train(fill=None):
    """A training run that measures nothing; ``fill(call)`` runs first (the disk fills, a file write fails)."""
    from types import SimpleNamespace

    calls = []

    def train(cell, lr, wd, seed, callbacks, with_test):
        calls.append(1)
        if fill is not None:
            fill(len(calls))
        v = 0.3 + lr + 0.001 * (seed % 7)
        m = {"val_error": v, "val_loss": v, "train_error": 0.1, "train_loss": 0.1, "val_size": 400,
             "wall_time_s": 0.01, "device": "cpu", "epochs": 1, "weight_norm": 1.0}
        if with_test:
            m.update(test_error=v, test_loss=v, gap_error=v - 0.1, gap_loss=v - 0.1)
        return SimpleNamespace(metrics=m, history=[])

    return train


def test_a_full_journal_disk_fails_the_running_unit_in_the_room_of_the_disk_reserve(tmp_path, monkeypatch):
    """The disk fills during a run: the append after it is cut off mid-write (ENOSPC), and the disk
    has room again only once the reserve is deleted. The worker undoes the torn append, deletes the
    reserve, fails its unit with the reason (re-queued, no retry counted) and stops with one line; the
    next launch makes the reserve whole and the study completes to its exact budgets."""
    import errno

    import wdstudy.journal as J
    from wdstudy.launch import create_cells
    from wdstudy.outage import StorageUnwritable

    from .conftest import quiet_worker

    spec_path = write_spec(tmp_path, task_defaults={"epochs": 1})
    spec = load_spec(spec_path)
    url = str((tmp_path / "out" / "optuna.journal").resolve())
    create_cells(spec, url, str(spec_path))
    reserve = Path(J.reserve_path(url))
    assert reserve.stat().st_size == J.RESERVE_BYTES
    disk = {"full": False}
    write_all = J._write_all

    def cut_short(fd, data):  # half the record reaches the file, then the disk is full
        if disk["full"] and reserve.exists():
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(J, "_write_all", cut_short)
    storage = open_storage(url)
    before = len(Path(url).read_bytes())
    with pytest.raises(StorageUnwritable) as stop:
        quiet_worker(spec, url, train=_fake_train(fill=lambda call: disk.update(full=call == 2))).run()
    assert str(stop.value) == (f"cannot write {url}: No space left on device; free space (or fix the permission) "
                               "and run the same command to resume")
    assert not reserve.exists()  # its room went to the failure records
    assert len(Path(url).read_bytes()) > before
    assert not list(tmp_path.glob("out/optuna.journal.torn-*"))  # the torn append was undone, not set aside
    trials = _trials(open_storage(url), "tiny")  # the journal reads whole
    states = [state for state, *_ in trials.values()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1
    assert optuna.trial.TrialState.RUNNING not in states
    (failed,) = [(kind, why) for state, _, kind, why in trials.values() if state == optuna.trial.TrialState.FAIL]
    assert failed[0] == "storage" and failed[1].endswith(f"stopped: cannot write {url}: No space left on device")
    assert states.count(optuna.trial.TrialState.WAITING) >= 1  # re-queued
    disk["full"] = False  # space freed: the next launch makes the reserve whole and resumes
    create_cells(spec, url, str(spec_path))
    assert reserve.stat().st_size == J.RESERVE_BYTES
    quiet_worker(spec, url, train=_fake_train()).run()
    storage = open_storage(url)
    assert_exact(storage, "tiny", budget=3, seeds=2, cells=2)
    _once_each(storage, "tiny")


def test_a_disk_that_fills_while_a_trial_is_being_taken_leaves_no_trial_running(tmp_path, monkeypatch):
    """Optuna's ask turns a WAITING trial RUNNING, then writes its parameters: a full disk between
    the two left a RUNNING trial that no worker owned, and so that nothing re-queued (the relaunch
    saw a trial of a live study with no owner). The worker fails it as the full disk's and stops."""
    import errno
    import re

    import wdstudy.journal as J
    from wdstudy.launch import create_cells
    from wdstudy.outage import StorageUnwritable

    from .conftest import quiet_worker

    spec_path = write_spec(tmp_path, task_defaults={"epochs": 1})
    spec = load_spec(spec_path)
    url = str((tmp_path / "out" / "optuna.journal").resolve())
    create_cells(spec, url, str(spec_path))
    reserve = Path(J.reserve_path(url))
    write_all = J._write_all
    param = re.compile(rb'"op_code": *5\b')  # optuna's JournalOperation.SET_TRIAL_PARAM

    def full_at_the_first_parameter(fd, data):
        if reserve.exists() and param.search(data):
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(J, "_write_all", full_at_the_first_parameter)
    with pytest.raises(StorageUnwritable):
        quiet_worker(spec, url, train=_fake_train()).run()
    trials = _trials(open_storage(url), "tiny")
    states = [state for state, *_ in trials.values()]
    assert optuna.trial.TrialState.RUNNING not in states, trials
    (failed,) = [(kind, why) for state, _, kind, why in trials.values() if state == optuna.trial.TrialState.FAIL]
    assert failed[0] == "storage" and failed[1].endswith(f"stopped: cannot write {url}: No space left on device")
    monkeypatch.setattr(J, "_write_all", write_all)  # space freed: the same command completes the study
    create_cells(spec, url, str(spec_path))
    quiet_worker(spec, url, train=_fake_train()).run()
    assert_exact(open_storage(url), "tiny", budget=3, seeds=2, cells=2)


@pytest.mark.parametrize("kind", ["error", "storage"])
def test_a_full_disk_counts_against_no_retry(tmp_path, kind):
    """A unit stopped by a full disk more often than any retry limit (MAX_LOST) keeps its parameters;
    runs that raise more than MAX_RETRY times are replaced."""
    from wdstudy import records as R
    from wdstudy.cells import MAX_LOST, MAX_RETRY, Cells
    from wdstudy.storage import trial_id

    from .conftest import setup_study

    spec, url = setup_study(tmp_path, task_defaults={"epochs": 1}, search={"trials": 1})  # one slot per cell
    cells = Cells(spec, open_storage(url))
    unit, _ = cells.reserve()
    first = (unit.study.study_name, unit.trial.user_attrs[R.GENERATION], unit.trial.user_attrs[R.SLOT])
    params = unit.trial.params
    for _ in range(MAX_RETRY + 1 if kind == "error" else MAX_LOST + 1):
        cells.fail(unit.study, trial_id(unit.trial), "worker h:1 stopped: cannot write X: No space left on device",
                   kind)
        unit, _ = cells.reserve()
        assert (unit.study.study_name, unit.trial.user_attrs[R.GENERATION], unit.trial.user_attrs[R.SLOT]) == first
    if kind == "storage":
        assert unit.trial.params == params and not unit.trial.user_attrs.get(R.VARIANT)
    else:
        assert unit.trial.params != params and unit.trial.user_attrs.get(R.VARIANT) == 1


@pytest.mark.parametrize("code", ["ENOSPC", "EACCES"])
@pytest.mark.parametrize("where", ["journal", "postgresql"])
def test_an_unwritable_file_of_the_run_fails_its_unit_with_the_reason(tmp_path, code, where):
    """The run's own file cannot be written while the storage is fine (a database, a journal on
    another disk): the unit fails with the reason, is re-queued, and the worker stops with one line."""
    import errno

    from wdstudy.journal import RESERVE_BYTES, keep_reserve, reserve_path
    from wdstudy.outage import StorageUnwritable

    from .conftest import quiet_worker

    name = f"disk{uuid.uuid4().hex[:8]}"
    url = PG_URL if where == "postgresql" else str((tmp_path / "out" / "optuna.journal").resolve())
    spec = load_spec(write_spec(tmp_path, name=name, task_defaults={"epochs": 1}))
    from wdstudy.cells import ensure_studies

    ensure_studies(spec, open_storage(url))
    if where == "journal":
        assert keep_reserve(url)
    number = getattr(errno, code)

    def refused(call):
        raise OSError(number, os.strerror(number), "/data/runs/export.csv")

    try:
        with pytest.raises(StorageUnwritable) as stop:
            quiet_worker(spec, url, train=_fake_train(fill=refused)).run()
        assert str(stop.value).startswith(f"cannot write the run's files: /data/runs/export.csv: {os.strerror(number)};")
        trials = _trials(open_storage(url), name)
        (failed,) = [(kind, why) for state, _, kind, why in trials.values() if state == optuna.trial.TrialState.FAIL]
        assert failed == ("storage", failed[1]) and failed[1].endswith(
            f"stopped: cannot write the run's files: /data/runs/export.csv: {os.strerror(number)}")
        states = [state for state, *_ in trials.values()]
        assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.WAITING in states
        if where == "journal":  # the journal had room: its reserve is kept
            assert Path(reserve_path(url)).stat().st_size == RESERVE_BYTES
    finally:
        if where == "postgresql":
            _drop(url, name)


def test_the_disk_reserve_is_no_journal_and_a_disk_without_room_gets_none(tmp_path, monkeypatch, capsys):
    """``repair`` and every storage opening refuse the reserve; a disk without room for it gets
    none, and no partial file."""
    import errno

    import wdstudy.journal as J
    from wdstudy.cli import main
    from wdstudy.errors import WdstudyError

    url = str(tmp_path / "optuna.journal")
    open_storage(url)
    assert J.keep_reserve(url, size=4096) and os.path.getsize(J.reserve_path(url)) == 4096
    assert main(["repair", J.reserve_path(url), "--yes"]) == 2
    assert "disk reserve, not a journal" in capsys.readouterr().err
    with pytest.raises(WdstudyError, match="disk reserve, not a journal"):
        open_storage(J.reserve_path(url))
    assert J.release_reserve(url) and not J.release_reserve(url)
    write_all = J._write_all

    def no_room(fd, data):
        write_all(fd, data[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(J, "_write_all", no_room)
    assert not J.keep_reserve(url)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.journal"]
