"""The study engine end to end, through the real CLI and real worker processes, on the CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from wdstudy.analysis import evaluations_frame, progress_frame, trials_frame
from wdstudy.cli import main
from wdstudy.storage import open_storage

from .conftest import PG_URL, assert_exact, cli, journal, popen, retries_of, running_trials, wait_for, write_spec

# -- the whole flow ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    spec = write_spec(tmp_path)
    r = cli("launch", str(spec), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp_path, spec, r


@pytest.mark.integration
def test_end_to_end_every_cell_has_its_budget_and_evaluation(finished_study):
    tmp_path, spec, r = finished_study
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=3, seeds=2, cells=2)
    names = {s.study_name for s in storage.get_all_studies()}
    assert {"tiny/mlp-mnist1d/adam/l2", "tiny/mlp-mnist1d/adam/decoupled",
            "tiny/mlp-mnist1d/adam/l2/eval", "tiny/mlp-mnist1d/adam/decoupled/eval"} == names
    trials = trials_frame(storage, "tiny")
    done = trials[trials.state == "COMPLETE"]
    for col in ("train_loss", "train_error", "val_loss", "val_error", "val_gap_error", "weight_norm",
                "wall_time_s", "device", "seed"):
        assert done[col].notna().all(), col
    assert (done.penalty.notna() == (done.regularizer == "l2")).all()
    # λ stays inside each regularizer's own range
    l2 = done[done.regularizer == "l2"].weight_decay
    dec = done[done.regularizer == "decoupled"].weight_decay
    assert l2.between(1e-5, 1e-2).all() and dec.between(1e-2, 10).all()
    # per-epoch curves: in the user attributes and as Optuna intermediate values
    study = optuna.load_study(study_name="tiny/mlp-mnist1d/adam/l2", storage=storage)
    t = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[0]
    assert len(t.user_attrs["history"]) == 2 and sorted(t.intermediate_values) == [0, 1]
    assert t.intermediate_values[1] == pytest.approx(t.user_attrs["val_error"])
    assert study.user_attrs["versions"]["optuna"] == optuna.__version__
    assert "name: tiny" in study.user_attrs["spec_yaml"]
    # evaluation: best configuration, seeds 1000 and 1001, measured on the test split
    ev = evaluations_frame(storage, "tiny")
    for cell, g in ev.groupby("cell"):
        best = done[done.cell == cell].sort_values("value").iloc[0]
        assert (g.lr == best.lr).all() and (g.weight_decay == best.weight_decay).all()
        assert sorted(g.seed) == [1000, 1001]
        assert g.test_error.notna().all() and (g.gap_error == g.test_error - g.train_error).all()
    # exports
    out = tmp_path / "out"
    for stem, n in (("trials", 6), ("evaluations", 4)):
        assert len(pd.read_csv(out / f"{stem}.csv")) == n
        assert len(pd.read_parquet(out / f"{stem}.parquet")) == n
    assert "mlp-mnist1d/adam/l2" in r.stdout and "test error" in r.stdout


@pytest.mark.integration
def test_relaunch_of_a_finished_study_adds_nothing(finished_study):
    tmp_path, spec, _ = finished_study
    before = len(trials_frame(journal(tmp_path), "tiny"))
    r = cli("launch", str(spec), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert len(trials_frame(journal(tmp_path), "tiny")) == before


@pytest.mark.integration
def test_status_shows_each_cell(finished_study, capsys):
    tmp_path, spec, _ = finished_study
    code = main(["status", str(spec)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("study tiny · storage ")
    assert lines[1].split() == ["cell", "trials", "run", "fail", "pruned", "best", "eval"]
    trials = trials_frame(journal(tmp_path), "tiny")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    expected = {}
    for arm in ("l2", "decoupled"):  # each cell finished: its 3 trials, none running or failed, both seeds
        g = trials[trials.cell == f"tiny/mlp-mnist1d/adam/{arm}"]
        pruned, best = int((g.state == "PRUNED").sum()), g[g.state == "COMPLETE"].value.min()
        expected[f"mlp-mnist1d/adam/{arm}"] = ["3/3", "0", "0", str(pruned), f"{best:.4f}", "2/2"]
    assert rows == expected


@pytest.mark.integration
def test_status_table_text(finished_study, capsys):
    tmp_path, spec, _ = finished_study
    main(["status", str(spec)])
    out = capsys.readouterr().out
    assert "mlp-mnist1d/adam/l2" in out and "3/3" in out and "2/2" in out


@pytest.mark.integration
def test_dashboard_serves_every_cell(finished_study):
    tmp_path, spec, _ = finished_study
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = popen("dashboard", str(spec), "--port", str(port))
    try:
        def studies():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    return json.load(resp)["study_summaries"]
            except OSError:
                return None

        listed = wait_for(studies, 60, "the dashboard to answer")
        names = {s["study_name"] for s in listed}
        assert {"tiny/mlp-mnist1d/adam/l2", "tiny/mlp-mnist1d/adam/decoupled"} <= names
        assert proc.poll() is None
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out


# -- devices, faults, resume, concurrency --------------------------------------------------


@pytest.mark.integration
def test_sigkill_mid_trial_retries_the_same_parameters(tmp_path):
    spec = write_spec(tmp_path, regularizers=["decoupled"],
                      search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 3},
                      task_defaults={"epochs": 25}, evaluation={"seeds": 1})
    launcher = popen("launch", str(spec), "--workers", "2", "--quiet")
    try:
        victim = wait_for(lambda: running_trials(tmp_path, "tiny"), 120, "a running trial")[0]
        time.sleep(0.5)  # mid-trial
        pid = int(victim["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=3, seeds=1, cells=1)
    df = trials_frame(storage, "tiny")
    failed = df[df.state == "FAIL"]
    assert list(failed.trial) == [victim["trial"]]
    assert "died" in failed.reason.iloc[0]
    retry = retries_of(df, victim)
    assert len(retry) == 1 and retry.state.iloc[0] == "COMPLETE"
    assert retry.lr.iloc[0] == victim["lr"] and retry.weight_decay.iloc[0] == victim["weight_decay"]


@pytest.mark.integration
def test_ctrl_c_then_resume_gives_exact_totals(tmp_path):
    spec = write_spec(tmp_path, search={"trials": 4}, task_defaults={"epochs": 15})
    launcher = subprocess.Popen([sys.executable, "-m", "wdstudy", "launch", str(spec), "--workers", "2", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(running_trials(tmp_path, "tiny")) >= 2, 180, "two running trials")
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    storage = journal(tmp_path)
    df = trials_frame(storage, "tiny")
    assert (df.state != "RUNNING").all()
    interrupted = df[df.state == "FAIL"]
    assert len(interrupted) >= 1
    for _, t in interrupted.iterrows():  # each one queued again
        assert (retries_of(df, t).state == "WAITING").sum() == 1

    r = cli("launch", str(spec), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=4, seeds=2, cells=2)
    df = trials_frame(storage, "tiny")
    for _, t in df[df.state == "FAIL"].iterrows():
        retry = retries_of(df, t)
        assert len(retry) == 1 and retry.lr.iloc[0] == t.lr


@pytest.mark.integration
def test_eight_workers_share_the_embedded_storage(tmp_path):
    spec = write_spec(tmp_path, search={"trials": 8}, task_defaults={"epochs": 1},
                      evaluation={"seeds": 2})
    r = cli("launch", str(spec), "--workers", "8", "--quiet", timeout=900)
    assert r.returncode == 0, r.stderr
    storage = journal(tmp_path)
    assert_exact(storage, "tiny", budget=8, seeds=2, cells=2)
    df = trials_frame(storage, "tiny")
    assert (df.state == "COMPLETE").all()
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert "locked" not in logs and "Traceback" not in logs
    assert df.worker.nunique() >= 2


@pytest.mark.integration
def test_divergence_ends_the_trial_and_the_study_goes_on(tmp_path):
    spec = write_spec(tmp_path, optimizers=[{"name": "sgd", "momentum": 0.9}], regularizers=["none", "l2"],
                      search={"lr": {"low": 1e4, "high": 1e6}, "weight_decay": {"low": 1e-5, "high": 1e-3},
                              "trials": 2})
    r = cli("launch", str(spec), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    df = trials_frame(journal(tmp_path), "tiny")
    assert len(df) == 4 and (df.state == "PRUNED").all()
    assert (df.outcome == "diverged").all() and df.reason.str.contains("nan|inf").all()
    prog = progress_frame(journal(tmp_path), "tiny")
    assert (prog.eval_total == 0).all()


@pytest.mark.integration
def test_postgresql_two_workers_on_one_study(tmp_path):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, name=name, storage=PG_URL, search={"trials": 3})
    procs = [popen("worker", str(spec), "--single") for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    storage = open_storage(PG_URL)
    try:
        assert_exact(storage, name, budget=3, seeds=2, cells=2)
        df = pd.concat([trials_frame(storage, name), evaluations_frame(storage, name)])
        assert df.worker.nunique() == 2  # both workers took units
    finally:
        for s in storage.get_all_studies():
            if s.study_name.startswith(f"{name}/"):
                optuna.delete_study(study_name=s.study_name, storage=storage)


# -- bad specs ------------------------------------------------------------------------------


BAD_SPECS = [
    ({"colour": "red"}, "colour='red': unknown key"),
    ({"search": {"trials": "many"}}, "search.trials='many'"),
    ({"search": {"lr": {"low": 1e-2, "high": 1e-3}}}, "search.lr"),
    ({"search": {"lr": {"low": -1, "high": 1e-3}}}, "search.lr.low=-1"),
    ({"search": {"lr": {"low": 1e-3, "high": 1e-3}}}, "must be below high"),
    ({"search": {"weight_decay": {"l2": {"low": 1e-6, "high": 1e-1}, "decoupled": {"low": 1e-2, "high": 1}}}},
     "equally wide in decades"),
    ({"tasks": ["mlp-imagenet"]}, "tasks.0.name='mlp-imagenet'"),
    ({"optimizers": ["rmsprop"]}, "optimizers.0.name='rmsprop'"),
    ({"regularizers": ["l3"]}, "regularizers=['l3']: unknown regularizer 'l3'"),
    ({"optimizers": [{"name": "adam", "weight_decay": 0.01}]}, "optimizers.0.weight_decay=0.01"),
    ({"search": {"sampler": "cmaes"}}, "search.sampler='cmaes'"),
    ({"search": {"pruner": "asha"}}, "search.pruner='asha'"),
    ({"tasks": [{"name": "mlp-mnist1d", "epochs": 0}]}, "tasks.0.epochs=0"),
]


@pytest.mark.parametrize("over,needle", BAD_SPECS)
def test_bad_spec_exit_2_naming_file_key_and_value(tmp_path, capsys, over, needle):
    spec = write_spec(tmp_path, **over)
    code = main(["launch", str(spec), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and str(spec) in err, err
    assert all(line.startswith("wdstudy: error: ") for line in err.strip().splitlines())
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntasks: [mlp-mnist1d\n")
    assert main(["launch", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid YAML" in err and "line" in err
    assert main(["launch", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.integration
def test_changed_spec_is_refused_on_resume(finished_study, tmp_path, capsys):
    src_tmp, spec, _ = finished_study
    changed = yaml.safe_load(spec.read_text())
    changed["search"]["lr"] = {"low": 1e-4, "high": 1e-2}
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    assert main(["status", str(path)]) == 0  # status reads only
    assert main(["launch", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "spec changed" in err and "lr_range" in err


def test_shipped_specs_are_valid():
    from wdstudy.spec import load_spec

    root = Path(__file__).resolve().parents[1] / "studies"
    names = {p.stem for p in root.glob("*.yaml")}
    assert {"quickstart", "mnist1d-full", "cifar10-adamw"} <= names
    for p in root.glob("*.yaml"):
        spec = load_spec(p)
        assert spec.cells()
    quick = load_spec(root / "quickstart.yaml")
    assert [c.label for c in quick.cells()] == [
        f"{t}/adam/{r}" for t in ("mlp-mnist1d", "cnn-mnist1d", "gru-mnist1d") for r in ("none", "l2", "decoupled")
    ]
    for p in root.glob("*.yaml"):  # shipped specs do not prune (it biases the comparison)
        assert load_spec(p).search.pruner == "none"
    assert quick.evaluation.looks()[0] == 5 and "independent" in load_spec(root / "mnist1d-full.yaml").regularizers
    assert quick.weight_decay_range("decoupled").axis == "shrink"


def test_the_committed_quickstart_answer_has_no_choice_at_an_edge():
    """The committed sample report: one row per cell, every chosen η and λ inside its range."""
    import pandas as pd

    from wdstudy.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    quick = load_spec(root / "studies" / "quickstart.yaml")
    summary = pd.read_csv(root / "reports" / "quickstart" / "tables" / "summary.csv", keep_default_na=False)
    assert sorted(summary.cell) == sorted(c.name for c in quick.cells())
    assert (summary.lr_edge == "").all() and (summary.weight_decay_edge == "").all(), summary[
        ["cell", "lr", "weight_decay", "lr_edge", "weight_decay_edge"]]
    assert (summary.seeds == 5).all() and (summary.diverged_seeds == 0).all()


@pytest.mark.integration
def test_postgresql_stale_trial_of_a_dead_machine_is_retried(tmp_path):
    """A worker on 'another machine' dies mid-trial: its heartbeat stops, the next worker
    (here on this machine) fails that trial and retries the same parameters."""
    name = f"pg-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, name=name, storage=PG_URL, regularizers=["decoupled"],
                      search={"weight_decay": {"low": 1e-2, "high": 10}, "trials": 2},
                      task_defaults={"epochs": 40}, evaluation={"seeds": 1})
    fast_beat = {**os.environ, "WDSTUDY_LEASE_INTERVAL": "1", "WDSTUDY_GRACE_PERIOD": "3"}
    other = subprocess.Popen([sys.executable, "-m", "wdstudy", "worker", str(spec), "--single"],
                             env={**fast_beat, "WDSTUDY_HOSTNAME": "node-b"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = open_storage(PG_URL)
    try:
        def running():
            df = trials_frame(storage, name)
            return [] if df.empty else df[(df.state == "RUNNING") & df.worker.notna()].to_dict("records")

        victim = wait_for(running, 120, "a running trial on node-b")[0]
        assert victim["worker"].startswith("node-b:")
        other.kill()
        other.wait()
        r = cli("worker", str(spec), "--single", env=fast_beat)
        assert r.returncode == 0, r.stderr
        assert_exact(storage, name, budget=2, seeds=1, cells=1)
        df = trials_frame(storage, name)
        failed = df[df.state == "FAIL"]
        assert list(failed.trial) == [victim["trial"]]
        assert "lease of node-b" in failed.reason.iloc[0]
        retry = retries_of(df, victim)
        assert len(retry) == 1 and retry.state.iloc[0] == "COMPLETE" and retry.lr.iloc[0] == victim["lr"]
    finally:
        if other.poll() is None:
            other.kill()
        for s in storage.get_all_studies():
            if s.study_name.startswith(f"{name}/"):
                optuna.delete_study(study_name=s.study_name, storage=storage)


def test_slot_planning_and_progress_text(monkeypatch):
    from wdstudy.errors import WdstudyError
    from wdstudy.launch import format_progress, plan_slots, progress_line

    slots = plan_slots("0,1", None)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
    cpu = plan_slots("cpu", 3)
    assert len(cpu) == 3 and all(s["CUDA_VISIBLE_DEVICES"] == "" and s["WDSTUDY_ACCELERATOR"] == "cpu" for s in cpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: one CPU worker per core, one thread each
    cores = os.cpu_count() or 1
    assert plan_slots("auto", None) == [{"CUDA_VISIBLE_DEVICES": "", "WDSTUDY_THREADS": "1",
                                        "WDSTUDY_ACCELERATOR": "cpu"}] * cores
    with pytest.raises(WdstudyError, match="--devices='0,0'"):
        plan_slots("0,0", None)
    with pytest.raises(WdstudyError, match="--workers=0"):
        plan_slots("cpu", 0)
    df = pd.DataFrame([{"cell": "t/adam/l2", "budget": 10, "done": 4, "complete": 3, "pruned": 1, "fail": 1,
                        "running": 2, "waiting": 0, "best": 0.1234, "eval_done": 0, "eval_total": 3}])
    table = format_progress(df, 65, 125)
    assert "t/adam/l2" in table and "4/10" in table and "0.1234" in table and "0:02:05 left" in table
    line = progress_line(df, 65, None)
    assert line == "[0:01:05] trials 4/10 · evaluation 0/3 · running 2 · failed 1 · pruned 1"
    from rich.console import Console

    from wdstudy.launch import progress_table

    console = Console(record=True, width=140, force_terminal=False)
    console.print(progress_table(df.assign(race_done=2, race_total=6), 65, 125))
    shown = console.export_text()
    for needle in ("cell", "race", "evaluation", "t/adam/l2", "4/10", "0.1234", "2/6", "0/3", "about 0:02:05 left"):
        assert needle in shown, needle


@pytest.mark.integration
def test_launch_on_a_terminal_shows_a_live_table(tmp_path):
    """launch under a pseudo-terminal draws rich's live table and leaves the final one on screen."""
    import os
    import pty

    spec = write_spec(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: launch on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "wdstudy", "launch", str(spec), "--workers", "2"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "wdstudy launch" in text and "evaluation" in text  # the rich table's title and header
    assert "mlp-mnist1d/adam/decoupled" in text and "3/3" in text and "2/2" in text  # its final state


@pytest.mark.parametrize("args,needle", [
    (["train", "--task", "mlp-mnist1d", "--set", "width=[1,"], "width='[1,'"),
    (["train", "--task", "mlp-mnist1d", "--seed=-1", "--epochs", "1"], "seed=-1"),
    (["status", "SPEC", "--storage", "OUT"], "is a folder"),
    (["status", "SPEC", "--storage", "mysql://u@h/db"], "storage='mysql://u@h/db'"),
])
def test_more_bad_input_is_a_clean_error(tmp_path, capsys, args, needle):
    spec = write_spec(tmp_path)
    (tmp_path / "out").mkdir()
    args = [str(spec) if a == "SPEC" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("wdstudy: error: "), err


def test_negative_seed_in_a_spec_is_refused(tmp_path, capsys):
    spec = write_spec(tmp_path, search={"seed": -1})
    assert main(["launch", str(spec)]) == 2
    assert "search.seed=-1" in capsys.readouterr().err


@pytest.mark.integration
def test_grid_search_covers_each_point_once_and_reports_a_heatmap(tmp_path):
    from wdstudy.cells import ensure_studies
    from wdstudy.report import build_report
    from wdstudy.spec import load_spec
    from wdstudy.worker import Worker

    spec = load_spec(write_spec(tmp_path, regularizers=["none", "l2"],
                                search={"sampler": "grid", "grid_points": 2, "trials": None,
                                        "weight_decay": {"low": 1e-5, "high": 1e-3}},
                                evaluation={"seeds": 1}))
    url = str(tmp_path / "out" / "optuna.journal")
    ensure_studies(spec, open_storage(url))
    Worker(spec, url, poll=0.1, log=lambda m: None).run()
    storage = open_storage(url)
    df = trials_frame(storage, "tiny")
    l2 = df[df.regularizer == "l2"]
    assert len(df[df.regularizer == "none"]) == 2 and len(l2) == 4
    points = {(r.lr, r.weight_decay) for r in l2.itertuples()}
    assert points == {(a, b) for a in (1e-3, 1e-2) for b in (1e-5, 1e-3)}  # endpoints exactly
    paths = build_report(storage, "tiny", tmp_path / "out", url)
    html = paths.html.read_text()
    assert "Heatmap of the grid" in html
    # each arm's budget is its number of grid points: 2 × 2 (η, λ) for L2, 2 (η) for none
    assert "Search: grid sampler (seed 0), 4 (L2), 2 (none) trials per cell in generations of 4," in html


def test_spec_names_every_regularizer_arm_and_nothing_else():
    from wdstudy.regularizers import REGULARIZERS
    from wdstudy.spec import REGULARIZER_NAMES

    assert sorted(REGULARIZERS) == sorted(REGULARIZER_NAMES)
