"""``submit --slurm`` against a real one-node Slurm cluster (``tests/slurm/up.sh`` starts it).

Where Slurm is not installed (no ``sbatch``), the tests that submit skip with that reason;
where it is installed but does not answer, they fail. ``.ci/run`` starts it, so in CI they run.
The dry run and the refusals need no Slurm.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

from wdstudy.analysis import evaluations_frame, trials_frame
from wdstudy.storage import open_storage

from .conftest import PG_URL, assert_exact, cli, password_role, pdf_text, wait_for, write_spec

# One cluster, one node: these tests run one after another, in one test process (pytest-xdist)
pytestmark = pytest.mark.xdist_group("slurm")


def slurm_state(job: str) -> tuple[str, str]:
    """(JobState, ExitCode) of a job or array task, as scontrol reports it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "GONE"), fields.get("ExitCode", "")


def jobs_of(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "--name", f"wdstudy-{name},wdstudy-{name}-report", "-o", "%i"],
                         capture_output=True, text=True).stdout
    return out.split()


@pytest.fixture
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed here (no sbatch); bash tests/slurm/up.sh installs and starts it")
    deadline = time.monotonic() + 60
    while True:  # a node still completing the previous test's jobs ("comp") is up: wait for it
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or not r.stdout.startswith("comp") or time.monotonic() > deadline:
            break
        time.sleep(1)
    if r.returncode != 0 or not r.stdout.strip() or r.stdout.split()[0] not in ("idle", "mix", "alloc"):
        pytest.fail(f"Slurm is installed but its node is not up ({r.stdout.strip() or r.stderr.strip()}); "
                    "run bash tests/slurm/up.sh")


@pytest.fixture
def pg_study():
    names = []
    yield lambda: names.append(f"slurm-{uuid.uuid4().hex[:8]}") or names[-1]
    storage = open_storage(PG_URL)
    for s in storage.get_all_studies():
        if any(s.study_name.startswith(f"{n}/") for n in names):
            optuna.delete_study(study_name=s.study_name, storage=storage)
    for n in names:
        for job in jobs_of(n):
            subprocess.run(["scancel", job])


def exec_line(script: str) -> list[str]:
    return shlex.split(next(line for line in script.splitlines() if line.startswith("exec ")))


def submit_ids(stdout: str) -> tuple[str | None, str]:
    words = stdout.split()
    array = words[words.index("array") + 1] if "array" in words else None
    return array, words[words.index("job") + 1]


# -- without Slurm ------------------------------------------------------------------------------


@pytest.mark.integration
def test_dry_run_prints_both_scripts_and_submits_nothing(tmp_path):
    spec = write_spec(tmp_path, storage=PG_URL)
    r = cli("submit", str(spec), "--slurm", "--nodes", "3", "--gpus-per-node", "2", "--per-device", "4",
            "--cpus-per-task", "16", "--partition", "gpu", "--time", "2:00:00", "--account", "lab", "--qos", "high",
            "--array-parallelism", "2", "--slurm-arg", "mem=32G", "--slurm-arg", "exclusive", "--dry-run")
    assert r.returncode == 0, r.stderr
    workers, report = r.stdout.split("#!/bin/bash")[1:]
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --requeue", "#SBATCH --mem=32G", "#SBATCH --exclusive", "#SBATCH --nodes=1"):
        assert line in workers.splitlines(), line
    command = exec_line(workers)
    assert command[0] == "exec" and command[2:5] == ["-m", "wdstudy", "worker"]
    # 16 CPUs over 2 GPUs x 4 workers: 2 threads each
    assert command[command.index("--per-device") + 1] == "4" and command[command.index("--threads") + 1] == "2"
    assert command[command.index("--storage") + 1] == PG_URL
    assert "#SBATCH --dependency=afterany:ARRAY_JOB_ID" in report.splitlines()
    assert exec_line(report)[-1] == "--finish"
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.integration
def test_a_storage_password_stays_out_of_the_scripts_and_the_jobs_command_lines(tmp_path):
    spec = write_spec(tmp_path)
    with password_role() as (url, password):
        r = cli("submit", str(spec), "--slurm", "--nodes", "2", "--storage", url, "--dry-run")
        assert r.returncode == 0, r.stderr
        assert password not in r.stdout + r.stderr and url.replace(password, "***") in r.stdout
        for script in r.stdout.split("#!/bin/bash")[1:]:
            assert "--storage" not in exec_line(script)  # the job reads WDSTUDY_STORAGE, which sbatch passes on
            assert ': "${WDSTUDY_STORAGE:?is not set' in script  # and stops at once without it
            assert subprocess.run(["bash", "-n"], input="#!/bin/bash" + script, text=True).returncode == 0
            guard = next(line for line in script.splitlines() if line.startswith(": "))
            env = {k: v for k, v in os.environ.items() if k != "WDSTUDY_STORAGE"}
            assert subprocess.run(["bash", "-c", guard], env=env, capture_output=True).returncode != 0
        r = cli("submit", str(spec), "--slurm", "--storage", url, "--slurm-arg", "export=NONE", "--dry-run")
        assert r.returncode == 2 and "--slurm-arg export=NONE: the jobs get the storage's password" in r.stderr
        assert password not in r.stderr


@pytest.mark.integration
def test_cpu_workers_per_task_follow_cpus_per_task(tmp_path):
    spec = write_spec(tmp_path)  # a journal file on one node is accepted
    r = cli("submit", str(spec), "--slurm", "--cpus-per-task", "3", "--dry-run")
    assert r.returncode == 0, r.stderr
    command = exec_line(r.stdout.split("#!/bin/bash")[1])
    assert command[command.index("--devices") + 1] == "cpu" and command[command.index("--workers") + 1] == "3"
    assert "#SBATCH --array=0-0" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "2"], "a journal file is safe for one node only"),
    (["--storage", "sqlite:///x.db"], "SQLite"),
    (["--per-device", "2"], "--per-device=2: applies to GPU workers only"),
    (["--slurm-arg", "array=0-9"], "--slurm-arg array=...: use its own option"),
    (["--nodes", "0"], "--nodes=0: must be >= 1"),
    ([], None),  # no --slurm: told to name the scheduler
])
@pytest.mark.integration
def test_refusals_are_one_line(tmp_path, args, needle):
    spec = write_spec(tmp_path)
    r = cli("submit", str(spec), *(["--slurm"] if needle else []), *args, "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (needle or "--slurm") in r.stderr


def test_a_stop_signal_whose_exception_was_swallowed_still_stops_the_worker(monkeypatch):
    """Seen under Slurm: scancel's SIGTERM landed while the garbage collector ran a weakref callback,
    where Python prints and drops the handler's exception; the worker then trained on, with SIGTERM
    ignored. The signal is remembered, and the next held block (recording, reserving) raises it."""
    from wdstudy.signals import StopSignal, WorkerStopped

    monkeypatch.setattr("signal.signal", lambda *a: None)  # leave this process's handlers alone
    stop = StopSignal()
    try:
        stop.handler(15, None)  # as in a weakref callback: raised, then dropped
    except WorkerStopped:
        pass
    with pytest.raises(WorkerStopped, match="signal 15"):
        with stop.held():
            pass



def test_a_run_stops_after_the_batch_in_which_a_dropped_stop_signal_arrived(monkeypatch):
    from wdstudy.signals import STOP, WorkerStopped
    from wdstudy.tasks import task_config
    from wdstudy.train import train_run
    from wdstudy.worker import _stop_check

    monkeypatch.setattr(STOP, "pending", 15)  # what the handler left behind
    seen = []
    with pytest.raises(WorkerStopped, match="signal 15"):
        train_run(task_config("mlp-mnist1d", width=8, max_train=400, epochs=3), "adam", "l2", 1e-3, 1e-4,
                  accelerator="cpu", callbacks=[_stop_check()], on_device=seen.append)
    assert seen  # it had started training


# -- on the real cluster ----------------------------------------------------------------------------


@pytest.mark.integration
def test_submit_runs_a_study_to_exact_budgets_and_a_report(tmp_path, slurm, pg_study):
    """Run as a role with a password, given on submit's command line (then in WDSTUDY_STORAGE): the
    jobs get it in their environment; it is in no output, no file of the study, no job's command."""
    name = pg_study()
    spec = write_spec(tmp_path, name=name, search={"trials": 3})
    with password_role() as (url, password):
        r = cli("submit", str(spec), "--slurm", "--nodes", "2", "--cpus-per-task", "1", "--time", "15",
                "--storage", url)
        assert r.returncode == 0, r.stderr
        array, report = submit_ids(r.stdout)
        assert array and "squeue" in r.stdout and "status" in r.stdout
        texts = [r.stdout, r.stderr] + [subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                                                       text=True).stdout for job in (array, report)]
        assert all("Command=" in t for t in texts[2:])
        wait_for(lambda: not jobs_of(name), 900, "the array and the report job to end", interval=2)
        for task in (f"{array}_0", f"{array}_1"):
            assert slurm_state(task) == ("COMPLETED", "0:0"), task
        assert slurm_state(report) == ("COMPLETED", "0:0")
        storage = open_storage(PG_URL)
        assert_exact(storage, name, budget=3, seeds=2, cells=2)
        ev = evaluations_frame(storage, name)
        assert sorted(ev.groupby("cell").seed.apply(lambda s: tuple(sorted(s))).unique()) == \
            [tuple(sorted(ev.seed.unique()))]  # every evaluation seed, the same in both cells
        assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "report.pdf").exists()
        logs = sorted(p.name for p in (tmp_path / "out" / "logs").glob("slurm-*"))
        assert f"slurm-{array}_0.out" in logs and f"slurm-{array}_1.out" in logs
        # a second submit of the finished study only writes the report again
        r = cli("submit", str(spec), "--slurm", "--nodes", "2", env={**os.environ, "WDSTUDY_STORAGE": url})
        assert r.returncode == 0 and "submitted only report job" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: not jobs_of(name), 300, "the report job to end", interval=1)
        texts += [r.stdout, r.stderr]
        for f in (tmp_path / "out").rglob("*"):
            if f.is_file():
                texts.append(pdf_text(f) if f.suffix == ".pdf" else f.read_bytes().decode("latin-1"))
        assert not [t[:200] for t in texts if password in t]


@pytest.mark.integration
def test_a_cancelled_array_task_requeues_its_trial_and_a_resubmit_completes(tmp_path, slurm, pg_study):
    name = pg_study()
    spec = write_spec(tmp_path, name=name, storage=PG_URL, regularizers=["decoupled"],
                      task_defaults={"epochs": 40}, search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2},
                      evaluation={"seeds": 1})
    r = cli("submit", str(spec), "--slurm", "--nodes", "1", "--cpus-per-task", "1")
    assert r.returncode == 0, r.stderr
    array, report = submit_ids(r.stdout)
    storage = open_storage(PG_URL)

    def running():
        df = trials_frame(storage, name)
        return not df.empty and ((df.state == "RUNNING") & df.worker.notna()).any()

    wait_for(running, 600, "a trial to run under Slurm", interval=0.5)
    subprocess.run(["scancel", f"{array}_0"], check=True)
    wait_for(lambda: not jobs_of(name), 300, "the cancelled task and the report job to end", interval=1)
    assert slurm_state(f"{array}_0")[0] == "CANCELLED"
    assert slurm_state(report)[0] == "FAILED"  # it ran after the array (afterany) and found the study unfinished
    df = trials_frame(storage, name)
    assert not (df.state == "RUNNING").any()
    lost = df[df.state == "FAIL"]
    assert len(lost) >= 1 and (lost.fail_kind == "lost").all() and lost.reason.str.contains("signal 15").all()

    time.sleep(1)
    r = cli("submit", str(spec), "--slurm", "--nodes", "1", "--cpus-per-task", "1")
    assert r.returncode == 0 and "submitted array" in r.stdout, r.stdout + r.stderr
    _, report = submit_ids(r.stdout)
    wait_for(lambda: not jobs_of(name), 900, "the resubmitted study to finish", interval=2)
    assert slurm_state(report) == ("COMPLETED", "0:0")
    assert_exact(open_storage(PG_URL), name, budget=2, seeds=1, cells=1)
    assert (tmp_path / "out" / "report.html").exists()


PACED = f"{Path(__file__).parent / 'slurm' / 'paced_task.py'}:build"


def paced_spec(tmp_path, name: str, *, pause: float, epochs: int, trials: int):
    """A one-cell study (decoupled decay, 1 evaluation seed) on PostgreSQL of the paced test task: each
    unit takes at least ``epochs × pause`` seconds, whatever the load."""
    return write_spec(tmp_path, name=name, storage=PG_URL, regularizers=["decoupled"],
                      tasks=[{"name": "paced", "factory": PACED, "pause": pause, "batch_size": 64}],
                      task_defaults={"epochs": epochs}, search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": trials},
                      evaluation={"seeds": 1})


@pytest.mark.integration
def test_an_array_task_at_its_time_limit_requeues_its_trial_and_a_resubmit_completes(tmp_path, slurm, pg_study):
    """At a task's --time Slurm sends SIGTERM (SIGKILL follows after KillWait): the worker fails and
    re-queues its running unit and exits, the task ends TIMEOUT and stays ended (--requeue brings
    back preempted tasks, not timed-out ones), and a second submit finishes the study."""
    name = pg_study()
    # four units (3 trials, 1 evaluation seed) of at least 25 s each (24 s of them paced, whatever the
    # load): Slurm ends the task 60 to 90 s after it starts (its controller checks limits every 30 s),
    # so after the first unit and before the last, mid-unit
    spec = paced_spec(tmp_path, name, pause=2.0, epochs=12, trials=3)
    r = cli("submit", str(spec), "--slurm", "--nodes", "1", "--cpus-per-task", "1", "--time", "1")
    assert r.returncode == 0, r.stderr
    array, report = submit_ids(r.stdout)
    wait_for(lambda: slurm_state(f"{array}_0")[0] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), 240,
             "the array task to reach its time limit", interval=1)
    assert slurm_state(f"{array}_0")[0] == "TIMEOUT"
    assert "DUE TO TIME LIMIT" in (tmp_path / "out" / "logs" / f"slurm-{array}_0.out").read_text()
    subprocess.run(["scancel", report], check=True)  # it would only find the study unfinished
    storage = open_storage(PG_URL)
    runs = pd.concat([trials_frame(storage, name), evaluations_frame(storage, name, survivors=True)])
    assert not (runs.state == "RUNNING").any()
    lost = runs[runs.state == "FAIL"]
    assert len(lost) == 1 and lost.fail_kind.eq("lost").all() and lost.reason.str.contains("signal 15").all()
    assert (runs.state == "COMPLETE").sum() >= 1  # the limit fell mid-study, not before its first unit
    unit = ["cell", "generation", "slot"]
    waiting = runs[runs.state == "WAITING"][unit].fillna(-1).values.tolist()
    assert lost[unit].fillna(-1).values.tolist()[0] in waiting  # the lost unit, re-queued
    wait_for(lambda: not jobs_of(name), 120, "the cancelled report job to go", interval=0.5)

    # two workers this time: a re-queued trial and one not yet run can train side by side
    r = cli("submit", str(spec), "--slurm", "--nodes", "1", "--cpus-per-task", "2", "--time", "5")
    assert r.returncode == 0 and "submitted array" in r.stdout, r.stdout + r.stderr
    array, _ = submit_ids(r.stdout)
    wait_for(lambda: slurm_state(f"{array}_0")[0] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), 600,
             "the resubmitted array task to finish", interval=1)
    assert slurm_state(f"{array}_0") == ("COMPLETED", "0:0")
    assert_exact(open_storage(PG_URL), name, budget=3, seeds=1, cells=1)


def restarts(job: str) -> int:
    """How many times Slurm has re-queued a job or array task (scontrol's ``Restarts``)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return int(fields.get("Restarts", 0))


@pytest.mark.integration
def test_a_preempted_array_task_requeues_its_trial_and_comes_back_by_itself(tmp_path, slurm, pg_study):
    """The test cluster preempts by partition (tests/slurm/up.sh): a job of its ``urgent`` partition
    (higher PriorityTier) takes the node from jobs of ``preemptible`` (PreemptMode=REQUEUE). Slurm's
    SIGTERM reaches the worker, which fails its running trial as lost and re-queues it; the array task,
    submitted with --requeue, is re-queued by Slurm and, once the urgent job has ended, runs again and
    finishes the study: no second submit, exact budgets, the lost trial re-run with its parameters."""
    name = pg_study()
    # three units (2 trials, 1 evaluation seed) of at least 20 s each, paced whatever the load: the
    # urgent job lands mid-trial
    spec = paced_spec(tmp_path, name, pause=1.0, epochs=20, trials=2)
    r = cli("submit", str(spec), "--slurm", "--nodes", "1", "--cpus-per-task", "1", "--partition", "preemptible")
    assert r.returncode == 0, r.stderr
    array, report = submit_ids(r.stdout)
    task = f"{array}_0"
    storage = open_storage(PG_URL)

    def running():
        df = trials_frame(storage, name)
        return [] if df.empty else df[(df.state == "RUNNING") & df.worker.notna()].to_dict("records")

    victim = wait_for(running, 600, "a trial to run under Slurm", interval=0.5)[0]
    cpus = subprocess.run(["sinfo", "-h", "-p", "urgent", "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=urgent", f"--cpus-per-task={cpus}",
                             f"--job-name=wdstudy-{name}-urgent", f"--output={tmp_path / 'urgent.out'}",
                             "--wrap", "sleep 5"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        wait_for(lambda: restarts(task) >= 1, 120, "Slurm to preempt and re-queue the array task", interval=0.5)
        log = (tmp_path / "out" / "logs" / f"slurm-{task}.out").read_text()
        assert "DUE TO PREEMPTION" in log

        unit = ["cell", "generation", "slot"]

        def requeued():  # the worker recorded its stop: its trial failed, the trial's unit waiting again
            df = trials_frame(storage, name)
            failed = df[df.state == "FAIL"][unit].values.tolist()
            waiting = df[df.state == "WAITING"][unit].values.tolist()
            return [df] if failed and all(u in waiting for u in failed) else []
        [df] = wait_for(requeued, 60, "the preempted trial to be failed and re-queued", interval=0.5)
        assert not (df.state == "RUNNING").any()
        lost = df[df.state == "FAIL"]
        assert lost.trial.tolist() == [victim["trial"]]
        assert (lost.fail_kind == "lost").all() and lost.reason.str.contains("signal 15").all()

        wait_for(lambda: not jobs_of(name), 900, "the re-queued array task and the report job to end", interval=2)
    finally:
        subprocess.run(["scancel", urgent])
    assert slurm_state(task) == ("COMPLETED", "0:0") and restarts(task) == 1
    assert slurm_state(report) == ("COMPLETED", "0:0")  # after the array: the study was finished
    log = (tmp_path / "out" / "logs" / f"slurm-{task}.out").read_text()
    assert log.count("DUE TO PREEMPTION") == 1  # preempted once, then ran to its end
    storage = open_storage(PG_URL)
    assert_exact(storage, name, budget=2, seeds=1, cells=1)
    df = trials_frame(storage, name)
    assert not (df.state == "RUNNING").any()
    assert df[df.state == "FAIL"].trial.tolist() == [victim["trial"]]  # no other failure
    # the lost trial's slot completed with the same parameters: a retry, not a replacement proposal
    again = df[(df.state == "COMPLETE") & (df.generation == victim["generation"]) & (df.slot == victim["slot"])]
    assert len(again) == 1
    assert again.lr.iloc[0] == victim["lr"] and again.weight_decay.iloc[0] == victim["weight_decay"]
    assert (tmp_path / "out" / "report.html").exists()
