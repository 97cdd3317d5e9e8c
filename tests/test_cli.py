"""The command line as a user runs it: ``python -m wdstudy ...`` in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from wdstudy.cli import main


def run(*args: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "wdstudy", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.integration
def test_train_prints_metrics():
    r = run("train", "--task", "mlp-mnist1d", "--regularizer", "decoupled", "--weight-decay", "1e-3",
            "--lr", "1e-3", "--epochs", "2", "--test")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "mlp-mnist1d · adam · decoupled" in out
    for word in ("train", "val", "test", "gap (test − train)", "regularized-weight norm"):
        assert word in out


@pytest.mark.integration
def test_train_json_is_machine_readable():
    r = run("train", "--task", "cnn-mnist1d", "--regularizer", "l2", "--weight-decay", "1e-4",
            "--epochs", "1", "--json", "--set", "width=8", "--optimizer", "sgd", "--optimizer-set", "momentum=0.5")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["task"]["width"] == 8
    assert payload["metrics"]["penalty"] > 0
    assert len(payload["history"]) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--task", "mlp-nope"], "unknown task 'mlp-nope'"),
        (["--task", "mlp-mnist1d", "--weight-decay=-0.5"], "weight_decay=-0.5"),
        (["--task", "mlp-mnist1d", "--weight-decay", "nan"], "weight_decay=nan"),
        (["--task", "mlp-mnist1d", "--lr=-1e-3"], "lr=-0.001"),
        (["--task", "mlp-mnist1d", "--lr", "0"], "lr=0.0"),
        (["--task", "cnn-cifar10"], "data_dir=None"),
        (["--task", "cnn-mnist", "--data-dir", "/no/such/dir"], "data_dir='/no/such/dir'"),
        (["--task", "mlp-mnist1d", "--optimizer-set", "weight_decay=0.01"], "weight_decay=0.01"),
        (["--task", "mlp-mnist1d", "--set", "width=wide"], "width='wide'"),
        (["--task", "mlp-mnist1d", "--set", "depth=3"], "depth=3: unknown key"),
        (["--task", "mlp-mnist1d", "--set", "widthonly"], "'widthonly': expected KEY=VALUE"),
        (["--task", "mlp-mnist1d", "--regularizer", "none", "--weight-decay", "0.1"], "weight_decay=0.1"),
        (["--task", "cnn-curve1d"], "name='cnn-curve1d': model 'cnn' does not fit dataset 'curve1d'"),
        (["--task", "linreg-mnist1d"], "name='linreg-mnist1d': model 'linreg' does not fit dataset 'mnist1d'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, capsys):
    """In-process, so an unexpected exception (a traceback) fails the test."""
    code = main(["train", "--epochs", "1", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("wdstudy: error: ") and needle in lines[0], lines[0]


@pytest.mark.integration
def test_bad_input_from_a_real_process_has_no_traceback():
    r = run("train", "--task", "mlp-mnist1d", "--weight-decay=-1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "wdstudy: error: weight_decay=-1.0: must be a finite number >= 0"


@pytest.mark.integration
def test_unknown_choice_is_rejected_by_argparse():
    r = run("train", "--task", "mlp-mnist1d", "--optimizer", "rmsprop")
    assert r.returncode == 2 and "invalid choice: 'rmsprop'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
def test_divergence_exits_1_with_message():
    r = run("train", "--task", "mlp-mnist1d", "--optimizer", "sgd", "--lr", "1e6", "--epochs", "1",
            "--regularizer", "none", "--schedule", "constant")
    assert r.returncode == 1 and "diverged" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
def test_train_help_lists_both_linear_tasks():
    r = run("train", "--help")
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert "logreg-mnist1d" in words and "linreg-curve1d" in words  # whole names, never broken at a hyphen
    assert "curve1d" in r.stdout.split("--task")[-1]


def test_train_of_a_regression_prints_its_mse(capsys):
    assert main(["train", "--task", "linreg-curve1d", "--lr", "0.1", "--epochs", "5", "--test",
                 "--regularizer", "l2", "--weight-decay", "1e-3"]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if "split" in line)
    assert head.split() == ["split", "loss", "MSE"]
    assert "%" not in out and "points" not in out
    assert re.search(r"gap \(test − train\): loss [+-]\d\.\d{4}, MSE [+-]\d\.\d{4}$", out, re.M), out
