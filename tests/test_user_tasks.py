"""Your own model in a study: factory tasks (tensors and Datasets), brought LightningModules,
bad factories, the shipped example launched as a study, and ``load_results`` against its CSVs.

The factories used here live in ``examples/my_task.py`` (what a user copies) and in this
file (references and deliberately broken ones).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Callback, seed_everything

import wdstudy
from wdstudy.cells import cell_record, ensure_studies
from wdstudy.cli import main
from wdstudy.errors import WdstudyError
from wdstudy.regularizers import split_parameters
from wdstudy.spec import load_spec
from wdstudy.storage import open_storage
from wdstudy.tasks import task_config
from wdstudy.tasks.data import Split, batches
from wdstudy.tasks.user import UserTask, build_user_task
from wdstudy.train import evaluate, make_trainer, train_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/my_task.py"
LR, LAM, EPOCHS, TOL = 3e-3, 0.05, 3, 1e-6


# -- factories for these tests -------------------------------------------------------------------


def raising_factory(**options):
    raise ValueError("no data at /nowhere")


def wrong_return(**options):
    return {"model": None}


def lit_factory(lr, schedule, opt="adam", wd=0.0, start_lr=None):
    """The example's LightningModule on a small slice of its data (batch 32: 15 batches per epoch).

    ``opt`` / ``wd`` build the reference runs' optimizer (regularization inside PyTorch's
    Adam / AdamW, with the callbacks' decay / no-decay groups); ``start_lr`` builds a module
    that ignores the study's learning rate."""
    sys.path.insert(0, str(ROOT))
    from examples.my_task import LitClassifier, make_data

    train, val, test = make_data(800)
    module = LitClassifier(start_lr or lr, schedule, hidden=16)
    if opt != "adam" or wd:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt]

        def configure_optimizers():
            decay, no_decay = split_parameters(module)
            o = cls([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
            from wdstudy.train import cosine_factor

            total = module.trainer.estimated_stepping_batches
            s = torch.optim.lr_scheduler.LambdaLR(o, lambda step: cosine_factor(step, total))
            return {"optimizer": o, "lr_scheduler": {"scheduler": s, "interval": "step"}}

        module.configure_optimizers = configure_optimizers
    return UserTask(module, train, val, test)


class Keep(Callback):
    """Keeps the trained weights (Lightning moves the model to the CPU after fit; here it is there)."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- factory tasks: tensors and Datasets ----------------------------------------------------------


def test_factory_task_with_tensors_trains_and_measures_every_split():
    task = task_config("mine", factory=f"{EXAMPLE}:build", hidden=16, epochs=2, batch_size=64)
    assert task.options == {"hidden": 16}
    r = train_run(task, "adam", "l2", 1e-2, 1e-4, with_test=True, accelerator="cpu")
    m = r.metrics
    for k in ("train_error", "val_error", "test_error", "gap_error", "weight_norm", "zero_fraction"):
        assert np.isfinite(m[k]), k
    assert m["val_size"] == 240 and m["epochs"] == 2 and m["steps"] == 2 * 12
    assert [row["epoch"] for row in r.history] == [0, 1]
    assert all("val_error" in row and "weight_norm" in row for row in r.history)
    assert 0 < m["test_error"] < 0.5  # it learned something, and the problem is not trivial


@pytest.mark.integration
def test_factory_task_with_a_dataset_goes_through_dataloader_workers():
    ds = task_config("mine-ds", factory=f"{EXAMPLE}:build", hidden=16, as_dataset=True, num_workers=2,
                     epochs=2, batch_size=64)
    r2 = train_run(ds, "adam", "decoupled", 1e-2, 0.1, with_test=True, accelerator="cpu")
    # the same run with the examples loaded in this process: worker processes change nothing
    ds0 = task_config("mine-ds", factory=f"{EXAMPLE}:build", hidden=16, as_dataset=True, num_workers=0,
                      epochs=2, batch_size=64)
    r0 = train_run(ds0, "adam", "decoupled", 1e-2, 0.1, with_test=True, accelerator="cpu")
    for k in ("train_loss", "val_loss", "test_loss", "weight_norm"):
        assert r2.metrics[k] == pytest.approx(r0.metrics[k], rel=1e-6), k
    assert r2.metrics["steps"] == 24 and np.isfinite(r2.metrics["test_error"])
    # the loaders really are DataLoaders with workers, and measure what the tensors measure
    built = build_user_task(f"{EXAMPLE}:build", {"as_dataset": True}, lr=1e-2, schedule="cosine")
    loader = batches(built.train, 64, shuffle=True, seed=0, num_workers=built.num_workers)
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers == 2 and loader.persistent_workers
    tensors = build_user_task(f"{EXAMPLE}:build", {}, lr=1e-2, schedule="cosine")
    assert isinstance(tensors.train, Split)
    model = tensors.model
    assert evaluate(model, built.test, 100, num_workers=2) == pytest.approx(evaluate(model, tensors.test, 100))


@pytest.mark.integration
def test_seeds_reproduce_runs_and_change_the_initialization():
    task = task_config("mine", factory=f"{EXAMPLE}:build", hidden=16, epochs=1, batch_size=64)
    a = train_run(task, "adam", "l2", 1e-2, 1e-4, seed=3, accelerator="cpu").metrics
    b = train_run(task, "adam", "l2", 1e-2, 1e-4, seed=3, accelerator="cpu").metrics
    c = train_run(task, "adam", "l2", 1e-2, 1e-4, seed=4, accelerator="cpu").metrics
    assert a["val_loss"] == b["val_loss"] and a["val_loss"] != c["val_loss"]
    assert a["val_size"] == c["val_size"]  # the data is the same whatever the seed


def test_accumulation_is_refused_for_a_plain_module():
    task = task_config("mine", factory=f"{EXAMPLE}:build", epochs=1, accumulate_grad_batches=2)
    with pytest.raises(WdstudyError, match="accumulate_grad_batches=2 needs a LightningModule"):
        train_run(task, "adam", "l2", 1e-2, 1e-4, accelerator="cpu")


# -- a brought LightningModule: automatic optimization, gradient accumulation --------------------


def fit_reference(opt: str, wd: float, accumulate: int, seed: int = 0) -> dict:
    """The module with regularization inside PyTorch's optimizer, on exactly the batches
    wdstudy gives it (same seed, same ShuffledBatches, same accumulation)."""
    seed_everything(seed, workers=False, verbose=False)
    user = lit_factory(LR, "cosine", opt=opt, wd=wd)
    keep = Keep()
    trainer = make_trainer(EPOCHS, [keep], accelerator="cpu", accumulate_grad_batches=accumulate)
    trainer.fit(user.model, train_dataloaders=batches(Split(*user.train), 32, shuffle=True, seed=seed),
                val_dataloaders=batches(Split(*user.val), 2000, shuffle=False))
    return keep.state


def fit_ours(regularizer: str, wd: float, accumulate: int) -> tuple[dict, dict]:
    task = task_config("lit", factory="tests.test_user_tasks:lit_factory", epochs=EPOCHS, batch_size=32,
                       accumulate_grad_batches=accumulate)
    keep = Keep()
    r = train_run(task, "adam", regularizer, LR, wd, schedule="cosine", callbacks=[keep], accelerator="cpu")
    return keep.state, r.metrics


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.integration
def test_brought_lightning_module_l2_equals_adam_weight_decay_and_decoupled_equals_adamw(accumulate):
    plain = fit_reference("adam", 0.0, accumulate)
    ours_l2, m = fit_ours("l2", LAM, accumulate)
    assert m["steps"] == EPOCHS * (15 // accumulate)  # one optimizer step per `accumulate` batches
    assert max_diff(ours_l2, fit_reference("adam", LAM, accumulate)) <= TOL
    ours_dec, _ = fit_ours("decoupled", LAM * 10, accumulate)
    assert max_diff(ours_dec, fit_reference("adamw", LAM * 10, accumulate)) <= TOL
    assert max_diff(ours_l2, plain) > 1e-4 and max_diff(ours_dec, plain) > 1e-4  # both did something
    assert np.isfinite(m["train_error"]) and np.isfinite(m["val_error"])


def test_brought_module_is_measured_and_logs_its_curves():
    task = task_config("lit", factory=f"{EXAMPLE}:build_lightning", hidden=16, epochs=2, batch_size=64,
                       accumulate_grad_batches=2)
    r = train_run(task, "adam", "l1-decoupled", 1e-2, 0.05, with_test=True, accelerator="cpu")
    assert r.metrics["steps"] == 2 * 6 and np.isfinite(r.metrics["gap_error"])
    assert [sorted(row) for row in r.history] == [
        ["epoch", "lr", "penalty", "train_loss_running", "val_error", "val_loss", "weight_norm"]] * 2
    assert r.history[1]["lr"] < r.history[0]["lr"]  # the module followed the spec's cosine schedule
    assert 0 <= r.metrics["zero_fraction"] <= 1


@pytest.mark.parametrize("options, why", [
    ({"opt": "sgd"}, "built SGD, but this cell's optimizer is 'adam'"),
    ({"start_lr": 0.5}, "learning rate 0.5, not the study's 0.003"),
    ({"wd": 0.1}, "must be built with weight_decay=0"),
])
def test_brought_module_must_build_the_cells_optimizer_at_the_studys_lr(options, why):
    task = task_config("lit", factory="tests.test_user_tasks:lit_factory", epochs=1, batch_size=64, **options)
    with pytest.raises(WdstudyError, match=why):
        train_run(task, "adam", "l2", LR, LAM, accelerator="cpu")


# -- specs, records, bad factories -------------------------------------------------------------


def spec_dict(tmp_path: Path, tasks: list, **over) -> dict:
    spec = {
        "name": "mine",
        "tasks": tasks,
        "optimizers": ["adam"],
        "regularizers": ["l2"],
        "search": {"lr": {"low": 1e-3, "high": 1e-2}, "weight_decay": {"low": 1e-5, "high": 1e-2},
                   "sampler": "random", "trials": 2, "batch": 2},
        "evaluation": {"seeds": 1},
        "output": str(tmp_path / "out"),
        **over,
    }
    return spec


def write(tmp_path: Path, spec: dict, name: str = "mine.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec))
    return p


def test_cell_records_factory_and_options_and_refuses_a_changed_option(tmp_path):
    task = {"name": "mine", "factory": f"{EXAMPLE}:build", "hidden": 8, "epochs": 1}
    spec = load_spec(write(tmp_path, spec_dict(tmp_path, [task], task_defaults={"epochs": 3, "width": 64})))
    rec = cell_record(spec, spec.cells()[0])
    assert rec.task["factory"] == f"{EXAMPLE}:build" and rec.task["options"] == {"hidden": 8}
    assert rec.task["epochs"] == 1  # task_defaults give a factory task their training fields only
    builtin = load_spec(write(tmp_path, spec_dict(tmp_path, ["mlp-mnist1d"]), "b.yaml"))
    assert not {"factory", "options", "accumulate_grad_batches"} & set(cell_record(builtin, builtin.cells()[0]).task)
    storage = open_storage(str(tmp_path / "j.journal"))
    ensure_studies(spec, storage)
    ensure_studies(spec, storage)  # unchanged: fine
    changed = load_spec(write(tmp_path, spec_dict(tmp_path, [{**task, "hidden": 9}]), "c.yaml"))
    with pytest.raises(WdstudyError, match="the spec changed since this study started \\(task differ"):
        ensure_studies(changed, storage)


@pytest.mark.parametrize("factory, why", [
    ("no_such_pkg.tasks:build", "cannot import 'no_such_pkg.tasks' (ModuleNotFoundError: No module named 'no_such_pkg')"),
    ("examples/missing.py:build", "cannot import 'examples/missing.py' (FileNotFoundError: no such file"),
    (f"{EXAMPLE}:bulid", "'examples/my_task.py' has no attribute 'bulid'"),
    ("tests.test_user_tasks:raising_factory", "raised ValueError: no data at /nowhere"),
    ("tests.test_user_tasks:wrong_return", "returned a dict; return wdstudy.tasks.user.UserTask"),
    (f"{EXAMPLE}:build_lightning", "raised TypeError: build_lightning() got an unexpected keyword argument 'colour'"),
])
def test_bad_factory_is_one_line_naming_file_key_and_value_exit_2(tmp_path, capsys, monkeypatch, factory, why):
    monkeypatch.chdir(ROOT)
    path = write(tmp_path, spec_dict(tmp_path, [{"name": "mine", "factory": factory, "colour": "red"}]))
    assert main(["launch", str(path), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"wdstudy: error: {path}: tasks.0.factory={factory!r}: "), err
    assert why in err[0], err
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.integration
def test_bad_factory_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    path = write(tmp_path, spec_dict(tmp_path, [{"name": "mine", "factory": "no_such_pkg:build"}]))
    p = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(path), "--workers", "1", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == (f"wdstudy: error: {path}: tasks.0.factory='no_such_pkg:build': cannot import "
                                "'no_such_pkg' (ModuleNotFoundError: No module named 'no_such_pkg')")


def test_factory_task_names_and_fields_are_validated(tmp_path):
    bad = [
        ({"name": "mlp-mnist1d", "factory": f"{EXAMPLE}:build"}, "tasks.0.name='mlp-mnist1d': 'mlp-mnist1d' is a built-in task"),
        ({"name": "a/b", "factory": f"{EXAMPLE}:build"}, "tasks.0.name='a/b': use letters"),
        ({"name": "mine", "factory": "nocolon"}, "tasks.0.factory='nocolon': write module.path:function"),
        ({"name": "mlp-mnist1d", "accumulate_grad_batches": 2},
         "tasks.0.accumulate_grad_batches=2: applies to factory tasks only"),
    ]
    for task, why in bad:
        path = write(tmp_path, spec_dict(tmp_path, [task]))
        with pytest.raises(WdstudyError) as exc:
            load_spec(path)
        assert f"{path}: {why}" in str(exc.value)


@pytest.mark.integration
def test_a_worker_runs_factory_tasks_of_every_kind_with_pruning(tmp_path, monkeypatch):
    """Tensors, a Dataset and a LightningModule with accumulation as cells of one study, run by
    a worker in this process: the pruning callback reads the module's own logged val_error."""
    from wdstudy.analysis import evaluations_frame, trials_frame
    from wdstudy.worker import Worker

    monkeypatch.chdir(ROOT)
    tasks = [
        {"name": "t", "factory": f"{EXAMPLE}:build", "hidden": 8, "n": 600},
        {"name": "d", "factory": f"{EXAMPLE}:build", "hidden": 8, "n": 600, "as_dataset": True, "num_workers": 0},
        {"name": "lit", "factory": f"{EXAMPLE}:build_lightning", "hidden": 8, "n": 600,
         "accumulate_grad_batches": 2},
    ]
    over = {"task_defaults": {"epochs": 2, "batch_size": 64}}
    search = {"lr": {"low": 1e-3, "high": 1e-2}, "weight_decay": {"low": 1e-5, "high": 1e-2}, "sampler": "random",
              "trials": 3, "batch": 3, "pruner": "median"}
    spec = load_spec(write(tmp_path, {**spec_dict(tmp_path, tasks, **over), "search": search}))
    url = str(tmp_path / "out" / "optuna.journal")
    ensure_studies(spec, open_storage(url))
    Worker(spec, url, poll=0.01, log=lambda m: None).run()
    storage = open_storage(url)
    trials, evals = trials_frame(storage, "mine"), evaluations_frame(storage, "mine")
    assert sorted(trials.task.unique()) == ["d", "lit", "t"]
    assert (trials.state == "COMPLETE").all() and trials.val_error.notna().all(), trials[["cell", "state", "reason"]]
    assert (trials[trials.task == "lit"].steps == 2 * 3).all()  # 360 examples, batch 64, 2 per step: 3 steps an epoch
    assert len(evals) == 3 and evals.test_error.notna().all()
    lit = [t for s in storage.get_all_studies() if s.study_name == "mine/lit/adam/l2"
           for t in storage.get_all_trials(s._study_id)]
    assert len(lit) == 3
    for t in lit:
        assert len(t.user_attrs["history"]) == 2 and "val_error" in t.user_attrs["history"][0]
        # the pruning callback reported the module's logged val_error for each epoch
        assert sorted(t.intermediate_values) == [0, 1]
        assert t.intermediate_values[1] == pytest.approx(t.user_attrs["history"][1]["val_error"])


# -- the shipped example as a study, and load_results -------------------------------------------


@pytest.fixture(scope="module")
def example_study(tmp_path_factory):
    """``examples/`` copied into a fresh folder and launched from there, as the README says."""
    root = tmp_path_factory.mktemp("example")
    shutil.copytree(ROOT / "examples", root / "examples")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "wdstudy", "launch", "examples/my_study.yaml", "--workers", "1",
                        "--quiet"], capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return root, p


@pytest.mark.integration
def test_example_runs_as_a_two_trial_study(example_study):
    root, p = example_study
    out = root / "reports" / "my-study"
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(trials.cell.unique()) == ["my-study/my-mlp/adam/decoupled", "my-study/my-mlp/adam/l2"]
    assert (trials.groupby("cell").state.apply(lambda s: (s == "COMPLETE").sum()) == 2).all()
    evals = pd.read_csv(out / "evaluations.csv")
    assert len(evals) == 4 and (evals.state == "COMPLETE").all() and evals.test_error.notna().all()
    assert (out / "report.html").is_file()
    assert "my-mlp/adam/decoupled" in p.stdout


@pytest.mark.integration
def test_load_results_matches_the_exported_csvs(example_study, monkeypatch):
    root, _ = example_study
    monkeypatch.chdir(root)
    r = wdstudy.load_results("examples/my_study.yaml")
    assert r.study == "my-study"
    for frame, csv in ((r.trials, "trials.csv"), (r.evaluations, "evaluations.csv")):
        exported = pd.read_csv(root / "reports" / "my-study" / csv)
        assert list(frame.columns) == list(exported.columns)
        assert len(frame) == len(exported)
        numeric = [c for c in exported.columns if pd.api.types.is_numeric_dtype(exported[c])]
        assert {"value", "lr", "weight_decay", "test_error", "train_error"} & set(numeric)
        left = frame.sort_values(["cell", "trial"])[numeric].apply(pd.to_numeric).reset_index(drop=True)
        right = exported.sort_values(["cell", "trial"])[numeric].reset_index(drop=True)
        pd.testing.assert_frame_equal(left, right, check_dtype=False, rtol=1e-12)
        assert list(frame.sort_values(["cell", "trial"]).state) == list(exported.sort_values(["cell", "trial"]).state)
    comp = r.comparison
    assert list(comp[["task", "arm", "reference"]].itertuples(index=False, name=None)) == [("my-mlp", "decoupled", "l2")]
    assert comp.n_pairs.iloc[0] == 2 and isinstance(comp.verdict.iloc[0], str)
    # the comparison's difference is the mean of the exported per-seed differences
    ev = pd.read_csv(root / "reports" / "my-study" / "evaluations.csv").pivot(index="seed", columns="regularizer",
                                                                              values="test_error")
    assert comp.test_error_diff.iloc[0] == pytest.approx((ev.decoupled - ev.l2).mean())
    # the docstring's example runs as written (its outputs are skipped by doctest: they vary)
    import doctest

    from wdstudy.results import load_results as documented

    namespace: dict = {}
    for example in doctest.DocTestParser().get_examples(documented.__doc__):
        exec(example.source, namespace)
    assert namespace["r"].study == "demo"  # the example's own study, built in a temporary folder
    # the same from the journal alone (the study is the only one there)
    again = wdstudy.load_results(root / "reports" / "my-study" / "optuna.journal")
    assert again.study == "my-study" and len(again.trials) == len(r.trials)
    with pytest.raises(WdstudyError, match="spec_or_storage='nowhere.yaml': no such spec or journal file"):
        wdstudy.load_results("nowhere.yaml")
