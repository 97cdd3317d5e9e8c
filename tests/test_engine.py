"""The study engine under timing, faults and crashes: generations, retries, leases, repair.

Real worker processes and real storages (journal files; PostgreSQL where it matters);
faults are real signals, or exceptions raised from inside a worker's training call.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from wdstudy import records as R
from wdstudy.analysis import evaluations_frame, race_frame, trials_frame
from wdstudy.cells import MAX_RETRY, Cells, ensure_studies
from wdstudy.proposals import GenerationPruner, grid_order
from wdstudy.spec import LogRange, load_spec
from wdstudy.storage import HOST, StudyLock, open_storage
from wdstudy.worker import Worker

from .conftest import (
    PG_URL,
    assert_exact,
    cli,
    journal,
    popen,
    quiet_worker,
    real_training,
    running_trials,
    setup_study,
    wait_for,
    write_spec,
)


def _search_key(df: pd.DataFrame) -> pd.DataFrame:
    done = df[df.state.isin(["COMPLETE", "PRUNED"])]
    cols = ["cell", "generation", "slot", "lr", "weight_decay", "state", "value", "chosen"]
    return done[cols].sort_values(["cell", "generation", "slot"]).reset_index(drop=True)


# -- reproducibility -----------------------------------------------------------------------------


@pytest.mark.integration
def test_one_or_two_workers_give_the_same_trials_values_pruning_and_choices(tmp_path):
    over = dict(
        regularizers=["l2", "decoupled"],
        search={"sampler": "tpe", "startup_trials": 4, "trials": 12, "batch": 3, "pruner": "median",
                "lr": {"low": 1e-4, "high": 1.0}},
        task_defaults={"epochs": 3}, evaluation={"seeds": 2}, selection={"top_k": 2, "seeds": 2},
    )
    runs = {}
    for n in (1, 2):
        path = tmp_path / f"w{n}"
        path.mkdir()
        spec = write_spec(path, **over)
        r = cli("launch", str(spec), "--workers", str(n), "--threads", "1", "--quiet")
        assert r.returncode == 0, r.stdout + r.stderr
        storage = journal(path)
        assert_exact(storage, "tiny", budget=12, seeds=2, cells=2)
        runs[n] = (trials_frame(storage, "tiny"), evaluations_frame(storage, "tiny"), race_frame(storage, "tiny"))
    one, two = runs[1][0], runs[2][0]
    assert two.worker.nunique() == 2  # both workers took trials
    pd.testing.assert_frame_equal(_search_key(one), _search_key(two))
    assert (one.state == "PRUNED").sum() >= 1  # the median pruner did prune, identically in both
    assert set(one.generation) == {0, 1, 2, 3}
    e1, e2 = (e[["cell", "seed", "lr", "weight_decay", "value"]].sort_values(["cell", "seed"]).reset_index(drop=True)
              for e in (runs[1][1], runs[2][1]))
    pd.testing.assert_frame_equal(e1, e2)
    r1, r2 = (r.drop(columns=["race_values"]).sort_values(["cell", "search_rank"]).reset_index(drop=True)
              for r in (runs[1][2], runs[2][2]))
    assert len(r1) == 2 * 2 and r1.chosen.sum() == 2  # the race ran, and picked the same configurations
    pd.testing.assert_frame_equal(r1, r2)


def test_generation_pruner_sees_earlier_generations_only():
    seen = {}

    class Spy(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            seen["numbers"] = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
            return False

    study = optuna.create_study()
    for gen in (0, 0, 1, 1, 2):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={R.GENERATION: gen}))
    trial = optuna.trial.create_trial(value=0.5, user_attrs={R.GENERATION: 2})
    GenerationPruner(Spy()).prune(study, trial)
    assert seen["numbers"] == [0, 1, 2, 3]


def test_grid_points_lie_inside_their_range_exactly():
    r = LogRange(low=0.1, high=0.3)
    pts = r.grid(7)
    assert pts[0] == 0.1 and pts[-1] == 0.3
    assert all(0.1 <= p <= 0.3 for p in pts) and pts == sorted(pts)
    assert LogRange(low=1e-6, high=3.0).grid(1)[0] <= 3.0


def test_grid_order_is_fixed_and_covers_each_point_once(tmp_path):
    spec = load_spec(write_spec(tmp_path, search={"sampler": "grid", "grid_points": 3, "trials": None,
                                                  "weight_decay": {"l2": {"low": 0.1, "high": 0.3},
                                                                   "decoupled": {"low": 1.0, "high": 3.0}}}))
    cell = spec.cells()[0]
    a, b = grid_order(spec, cell), grid_order(spec, cell)
    assert a == b and len({tuple(p.values()) for p in a}) == 9


# -- faults inside a trial -----------------------------------------------------------------------


@pytest.mark.integration
def test_an_exception_in_a_trial_fails_it_and_the_worker_goes_on(tmp_path):
    spec, url = setup_study(tmp_path, regularizers=["decoupled"],
                       search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 3}, evaluation={"seeds": 1})
    real = real_training(spec)
    calls = {"n": 0}

    def flaky(cell, lr, wd, seed, callbacks, with_test):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(cell, lr, wd, seed, callbacks, with_test)

    ran = quiet_worker(spec, url, train=flaky).run()
    assert ran == 5  # 3 trials + 1 retry + 1 evaluation seed
    storage = open_storage(url)
    assert_exact(storage, "tiny", budget=3, seeds=1, cells=1)
    df = trials_frame(storage, "tiny")
    failed = df[df.state == "FAIL"]
    assert len(failed) == 1 and failed.fail_kind.iloc[0] == "error"
    assert failed.reason.iloc[0] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"
    retry = df[(df.generation == failed.generation.iloc[0]) & (df.slot == failed.slot.iloc[0]) & (df.state == "COMPLETE")]
    assert len(retry) == 1 and retry.lr.iloc[0] == failed.lr.iloc[0]


@pytest.mark.integration
def test_a_configuration_that_keeps_failing_is_replaced_after_the_retry_limit(tmp_path):
    spec, url = setup_study(tmp_path, regularizers=["decoupled"],
                       search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 3}, evaluation={"seeds": 1})
    real = real_training(spec)
    cursed = {}

    def poisoned(cell, lr, wd, seed, callbacks, with_test):
        cursed.setdefault("lr", lr)  # the first configuration always raises
        if lr == cursed["lr"]:
            raise ValueError("bad configuration")
        return real(cell, lr, wd, seed, callbacks, with_test)

    quiet_worker(spec, url, train=poisoned).run()
    storage = open_storage(url)
    assert_exact(storage, "tiny", budget=3, seeds=1, cells=1)
    df = trials_frame(storage, "tiny")
    failed = df[df.state == "FAIL"]
    assert len(failed) == MAX_RETRY + 1 and (failed.lr == cursed["lr"]).all()
    slot = df[(df.generation == failed.generation.iloc[0]) & (df.slot == failed.slot.iloc[0])]
    replacement = slot[slot.state == "COMPLETE"]
    assert len(replacement) == 1 and replacement.lr.iloc[0] != cursed["lr"]
    raw = optuna.load_study(study_name=spec.cells()[0].name, storage=storage).get_trials()
    assert sum(t.user_attrs.get(R.VARIANT) == 1 for t in raw) == 1


# -- trials whose owner is gone ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
@pytest.mark.parametrize("owner", ["node-b:4242", "SELF"])
@pytest.mark.integration
def test_a_running_trial_of_a_vanished_owner_is_failed_and_retried(tmp_path, backend, owner):
    """A trial left RUNNING by another host (journal or PostgreSQL), or by a pid of this host
    that has been reused by a live process: its lease expires and any worker retries it."""
    name = f"lease-{uuid.uuid4().hex[:8]}"
    storage_url = PG_URL if backend == "postgresql" else None
    spec = load_spec(write_spec(tmp_path, name=name, regularizers=["decoupled"], storage=storage_url,
                                search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2},
                                evaluation={"seeds": 1}))
    url = storage_url or str((tmp_path / "out" / "optuna.journal").resolve())
    storage = open_storage(url)
    try:
        ensure_studies(spec, storage)
        with StudyLock(url, spec.name):
            unit, _ = Cells(spec, storage).reserve()
        owner = f"{HOST}:{os.getpid()}" if owner == "SELF" else owner  # a live pid, not a worker
        tid = unit.trial._trial_id
        storage.set_trial_system_attr(tid, R.OWNER, owner)
        storage.set_trial_system_attr(tid, R.LEASE, time.time() - 3600)  # its owner stopped renewing
        quiet_worker(spec, url).run()
        assert_exact(storage, name, budget=2, seeds=1, cells=1)
        df = trials_frame(storage, name)
        failed = df[df.state == "FAIL"]
        assert list(failed.trial) == [unit.trial.number]
        assert f"lease of {owner} expired" in failed.reason.iloc[0] and failed.fail_kind.iloc[0] == "lost"
    finally:
        if backend == "postgresql":
            for s in storage.get_all_studies():
                if s.study_name.startswith(f"{name}/"):
                    optuna.delete_study(study_name=s.study_name, storage=storage)


@pytest.mark.integration
def test_a_half_created_evaluation_study_is_repaired(tmp_path):
    from wdstudy.synthetic import add_trials

    spec, url = setup_study(tmp_path, regularizers=["decoupled"],
                       search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 4}, evaluation={"seeds": 2})
    storage = open_storage(url)
    (cell,) = spec.cells()
    add_trials(spec, cell, storage, 4, 2, np.random.default_rng(0))  # a finished search
    optuna.create_study(study_name=cell.eval_name, storage=storage)  # killed before its configuration was recorded
    quiet_worker(spec, url).run()
    assert_exact(storage, "tiny", budget=4, seeds=2, cells=1)
    ev = optuna.load_study(study_name=cell.eval_name, storage=storage)
    best = optuna.load_study(study_name=cell.name, storage=storage).best_trial
    assert ev.user_attrs[R.BEST_PARAMS] == best.params and ev.user_attrs[R.BEST_TRIAL] == best.number
    assert all(t.params == best.params for t in ev.trials)


@pytest.mark.integration
def test_a_failed_trial_that_was_never_requeued_is_requeued(tmp_path):
    """Its worker died between failing it and queuing the retry: the slot is repaired."""
    spec, url = setup_study(tmp_path, regularizers=["decoupled"],
                       search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2}, evaluation={"seeds": 1})
    storage = open_storage(url)
    with StudyLock(url, spec.name):
        unit, _ = Cells(spec, storage).reserve()
    storage.set_trial_state_values(unit.trial._trial_id, TrialState.FAIL)  # no retry queued
    quiet_worker(spec, url).run()
    assert_exact(storage, "tiny", budget=2, seeds=1, cells=1)


# -- whole processes -----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.integration
def test_a_sigkill_storm_does_not_stop_the_study(tmp_path):
    spec = write_spec(tmp_path, search={"trials": 60, "batch": 4}, task_defaults={"epochs": 12},
                      evaluation={"seeds": 2})
    launcher = popen("launch", str(spec), "--workers", "2", "--threads", "1", "--quiet")
    rng = random.Random(0)
    kills = 0
    try:
        wait_for(lambda: running_trials(tmp_path, "tiny"), 120, "a running trial")
        while kills < 20 and launcher.poll() is None:
            time.sleep(rng.uniform(0.3, 1.5))  # short: the kills must outpace a fast machine's study
            workers = _children(launcher.pid)
            if workers and running_trials(tmp_path, "tiny"):  # kill while trials are in flight
                try:
                    os.kill(rng.choice(workers), signal.SIGKILL)
                except ProcessLookupError:  # it exited (or was reaped) since it was listed
                    continue
                kills += 1
        out, err = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert kills == 20, f"the study ended after {kills} kills; make it longer"
    assert launcher.returncode == 0, err
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=60, seeds=2, cells=2)
    df = trials_frame(storage, "tiny")
    assert (df.state == "FAIL").sum() >= 1 and (df[df.state == "FAIL"].fail_kind == "lost").all()


def kill_launch_when(spec: Path, ready, timeout: float, what: str, interval: float = 0.2) -> None:
    """Start ``launch`` with 2 workers, SIGKILL it once ``ready()`` holds, and wait until its
    workers, which watch their launcher, have stopped too."""
    launcher = popen("launch", str(spec), "--workers", "2", "--quiet")
    try:
        wait_for(ready, timeout, what, interval=interval)
        workers = _children(launcher.pid)
        launcher.kill()
        launcher.wait()
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in workers),
                 60, "the workers to stop")
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.integration
def test_a_dying_launcher_takes_its_workers_with_it_and_a_relaunch_finishes(tmp_path):
    spec = write_spec(tmp_path, search={"trials": 4}, task_defaults={"epochs": 20})
    kill_launch_when(spec, lambda: running_trials(tmp_path, "tiny"), 120, "a running trial")
    df = trials_frame(journal(tmp_path), "tiny")
    assert (df.state != "RUNNING").all()  # each worker failed and re-queued its own trial
    r = cli("launch", str(spec), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert_exact(journal(tmp_path), "tiny", budget=4, seeds=2, cells=2)


def test_a_signal_during_a_reservation_fails_and_requeues_the_reserved_trial(tmp_path, monkeypatch):
    """SIGTERM arriving while a worker reserves (signals held) stops it once the reservation is
    stored; the trial it reserved must not stay RUNNING: it is failed and re-queued."""
    from wdstudy.signals import STOP, WorkerStopped

    spec, url = setup_study(tmp_path, regularizers=["l2"], search={"trials": 2, "weight_decay": {"low": 1e-5, "high": 1e-2}})
    worker = Worker(spec, url, poll=0.1, log=lambda m: None)
    reserve = worker.cells.reserve

    def reserve_then_signal():
        out = reserve()
        STOP.handler(signal.SIGTERM, None)  # as a SIGTERM inside the held block: remembered, raised at its end
        return out

    monkeypatch.setattr(worker.cells, "reserve", reserve_then_signal)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(WorkerStopped):
            worker.run()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        STOP.pending = None
    df = trials_frame(open_storage(url), "tiny").sort_values("trial")
    assert not (df.state == "RUNNING").any()
    failed = df[df.state == "FAIL"]
    assert len(failed) == 1 and "stopped by signal" in failed.reason.iloc[0]
    assert failed.fail_kind.iloc[0] == R.LOST
    study = optuna.load_study(study_name=spec.cells()[0].name, storage=open_storage(url))
    queued = [t.system_attrs.get("fixed_params") for t in study.get_trials(states=(TrialState.WAITING,))]
    assert {"lr": failed.lr.iloc[0], "weight_decay": failed.weight_decay.iloc[0]} in queued  # its retry


@pytest.mark.integration
def test_the_pool_returns_only_after_its_warm_up_thread_has_finished(tmp_path):
    """The report forks its drawing processes right after the pool: a warm-up thread still running
    then (holding an import or font-cache lock) would leave a forked child waiting forever."""
    from wdstudy.launch import plan_slots, run_pool

    spec_path = write_spec(tmp_path, regularizers=["l2"], search={"trials": 1, "weight_decay": {"low": 1e-5, "high": 1e-2}},
                           evaluation={"seeds": 1})
    spec = load_spec(spec_path)
    url = str((tmp_path / "out" / "optuna.journal").resolve())
    ensure_studies(spec, open_storage(url))
    done = []

    def slow_warm():  # still running when the last unit is recorded
        time.sleep(8)
        done.append(time.monotonic())

    assert run_pool(str(spec_path), spec, url, plan_slots("cpu", 1, 1), quiet=True, warm=slow_warm)
    assert done and done[0] <= time.monotonic()


def _state(pid: int) -> str:
    try:
        return "zombie" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else "alive"
    except OSError:
        return "gone"


@pytest.mark.integration
def test_status_and_analysis_do_not_import_torch(tmp_path):
    spec = write_spec(tmp_path)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "wdstudy", "status", str(spec)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "optuna" in imported and not {"torch", "lightning"} & imported


@pytest.mark.integration
def test_a_crash_looping_worker_slot_is_given_up_with_a_clear_message(tmp_path):
    """Workers that die at start-up, every time: launch gives the slots up and exits 1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('WDSTUDY_PARENT_PID'):\n    raise SystemExit('broken worker environment')\n")
    spec = write_spec(tmp_path, search={"trials": 2})
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(spec), "--workers", "1", "--quiet"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr
    assert "crashed 8 times in a row without finishing a unit" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "out" / "logs" / "worker-0.log").read_text().count("SystemExit: broken worker environment") == 8


def test_a_cell_whose_every_run_fails_ends_instead_of_retrying_forever(tmp_path):
    from wdstudy.cells import MAX_VARIANT

    spec, url = setup_study(tmp_path, regularizers=["decoupled"],
                       search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2, "batch": 2},
                       evaluation={"seeds": 1})

    def broken(*args, **kwargs):
        raise RuntimeError("this model cannot be built")

    quiet_worker(spec, url, train=broken).run()  # returns: nothing left that could run
    df = trials_frame(open_storage(url), "tiny")
    assert (df.state == "FAIL").all() and (df.reason == "RuntimeError: this model cannot be built").all()
    assert len(df) == 2 * (MAX_VARIANT + 1) * (MAX_RETRY + 1)  # per slot: 3 proposals, 4 attempts each


@pytest.mark.parametrize("visible,devices,expected", [
    ("2,3", "auto", ["2", "3"]),
    ("2,3", "1", ["3"]),
    ("GPU-8f2c1d3e-aaaa-bbbb-cccc-0123456789ab,GPU-11112222-3333-4444-5555-666677778888", "auto",
     ["GPU-8f2c1d3e-aaaa-bbbb-cccc-0123456789ab", "GPU-11112222-3333-4444-5555-666677778888"]),
    ("MIG-GPU-8f2c1d3e/1/0,MIG-GPU-8f2c1d3e/2/0,MIG-GPU-8f2c1d3e/3/0", "0,2",
     ["MIG-GPU-8f2c1d3e/1/0", "MIG-GPU-8f2c1d3e/3/0"]),
])
@pytest.mark.integration
def test_dry_run_pins_workers_to_the_devices_the_job_was_given(tmp_path, visible, devices, expected):
    spec = write_spec(tmp_path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    r = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(spec), "--devices", devices, "--dry-run"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[2].split("=", 1)[1] for ln in lines] == expected
    assert all(ln.startswith(f"slot {i}: ") for i, ln in enumerate(lines))
    assert not (tmp_path / "out").exists()  # the plan touched no storage


@pytest.mark.integration
def test_dry_run_refuses_a_device_index_outside_the_job(tmp_path):
    spec = write_spec(tmp_path)
    r = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(spec), "--devices", "0,2", "--dry-run"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": "4,5"})
    assert r.returncode == 2 and "--devices='0,2': 2 is not an index" in r.stderr and "Traceback" not in r.stderr


def test_a_unit_queued_twice_is_run_once_whichever_copy_is_taken(tmp_path):
    """Copies of queued units (a creation whose answer was lost, made again): the reservation ends
    each copy FAIL, unrun, keeping the attempt that runs or was queued first, and goes on."""
    spec, url = setup_study(tmp_path, regularizers=["decoupled"],
                            search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2, "batch": 2},
                            evaluation={"seeds": 1})
    cells = Cells(spec, open_storage(url))
    first, _ = cells.reserve()  # opens generation 0 (two slots) and takes one of them
    assert first is not None
    study = first.study
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    for t in (*running, *waiting):  # the running slot and the waiting one, each queued again
        study.enqueue_trial(t.params, user_attrs={R.GENERATION: t.user_attrs[R.GENERATION], R.SLOT: t.user_attrs[R.SLOT]})
    second, _ = cells.reserve()
    assert second is not None and second.trial.number == waiting[0].number  # the one queued first
    trials = study.get_trials(deepcopy=False)
    copies = [t for t in trials if t.system_attrs.get(R.FAIL_KIND) == R.DUPLICATE]
    assert sorted(t.number for t in copies) == [2, 3] and all(t.datetime_start is None for t in copies)
    assert [t.state for t in trials[:2]] == [TrialState.RUNNING, TrialState.RUNNING]
    assert cells.reserve() == (None, False)  # nothing else to run until the two finish
