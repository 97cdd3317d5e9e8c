"""Tasks: data loading in the real on-disk formats, splits, models, metrics, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wdstudy.errors import WdstudyError
from wdstudy.tasks import TASKS, ShuffledBatches, Split, task_config
from wdstudy.tasks.data import _torchvision, load_data, split_indices
from wdstudy.train import DivergedError, train_run

from .conftest import write_cifar10, write_mnist_like

# -- files in the datasets' own formats -------------------------------------------------


@pytest.mark.parametrize("dataset,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_formats_load_through_torchvision(tmp_path, dataset, folder):
    written = write_mnist_like(tmp_path, folder)
    x, y = _torchvision(dataset, str(tmp_path), download=False, train=True)
    assert x.shape == (120, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.from_numpy(written["train"][0]))
    assert torch.equal(y, torch.from_numpy(written["train"][1]).long())
    data = load_data(dataset, data_dir=str(tmp_path), with_test=True, val_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 30, 40)
    # standardized with statistics of the training split alone (the validation split is held out)
    assert abs(float(data.train.x.mean())) < 1e-4 and abs(float(data.train.x.std()) - 1) < 1e-3
    train_idx, val_idx = split_indices(120, 0.25, 0)
    ref = x[train_idx].float() / 255
    mean, std = ref.mean(), ref.std()
    assert torch.allclose(data.val.x, (x[val_idx].float() / 255 - mean) / std, atol=1e-6)
    whole = x.float() / 255  # statistics of the whole training file (validation included) differ
    assert not torch.allclose(data.val.x, (x[val_idx].float() / 255 - whole.mean()) / whole.std(), atol=1e-6)


def test_cifar10_format_loads_through_torchvision(tmp_path):
    written = write_cifar10(tmp_path)
    x, y = _torchvision("cifar10", str(tmp_path), download=False, train=True)
    assert x.shape == (100, 3, 32, 32)
    first = torch.from_numpy(written["data_batch_1"][0][0].reshape(3, 32, 32))
    assert torch.equal(x[0], first)
    assert y[:20].tolist() == written["data_batch_1"][1]
    xt, yt = _torchvision("cifar10", str(tmp_path), download=False, train=False)
    assert xt.shape == (30, 3, 32, 32) and yt.tolist() == written["test_batch"][1]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_train_on_image_files_end_to_end(tmp_path, model):
    write_mnist_like(tmp_path, "MNIST", n_train=200, n_test=50)
    task = task_config(f"{model}-mnist", data_dir=str(tmp_path), epochs=3, batch_size=32, width=16)
    r = train_run(task, "adam", "l2", 3e-3, 1e-4, with_test=True, accelerator="cpu")
    assert r.metrics["train_error"] < 0.5  # the stroke is learnable
    assert r.metrics["test_error"] <= 1.0 and len(r.history) == 3


def test_cifar_cnn_forward_shape(tmp_path):
    write_cifar10(tmp_path)
    task = task_config("cnn-cifar10", data_dir=str(tmp_path), epochs=1, batch_size=25)
    r = train_run(task, "sgd", "decoupled", 0.01, 5e-4, with_test=True, accelerator="cpu")
    assert 0.0 <= r.metrics["test_error"] <= 1.0


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(WdstudyError, match="data_dir=None"):
        load_data("mnist")
    with pytest.raises(WdstudyError, match=r"data_dir='.*nowhere'.*download is off"):
        load_data("cifar10", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(WdstudyError, match=r"data_dir=.*'fashionmnist' not found"):
        load_data("fashionmnist", data_dir=str(tmp_path))


# -- MNIST-1D, splits, batches -------------------------------------------------------------


def test_mnist1d_sizes_and_test_only_when_asked():
    data = load_data("mnist1d")
    assert data.test is None
    assert (len(data.train), len(data.val)) == (3600, 400)
    assert data.train.x.shape[1:] == (40,)
    with_test = load_data("mnist1d", with_test=True)
    assert len(with_test.test) == 1000
    assert torch.equal(with_test.train.x, data.train.x)


def test_split_is_deterministic_disjoint_and_seeded():
    a_train, a_val = split_indices(100, 0.2, seed=3)
    b_train, b_val = split_indices(100, 0.2, seed=3)
    c_train, c_val = split_indices(100, 0.2, seed=4)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert not torch.equal(a_val, c_val)
    assert len(a_val) == 20 and len(set(a_train.tolist()) | set(a_val.tolist())) == 100
    with pytest.raises(WdstudyError, match="val_fraction"):
        split_indices(10, 0.01, 0)


def test_shuffled_batches_cover_the_split_and_reshuffle():
    split = Split(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    batches = ShuffledBatches(split, 4, seed=1)
    assert len(batches) == 3
    first = torch.cat([y for _, y in batches])
    second = torch.cat([y for _, y in batches])
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, second)
    again = ShuffledBatches(split, 4, seed=1)
    assert torch.equal(torch.cat([y for _, y in again]), first)
    for x, y in ShuffledBatches(split, 4, seed=1):
        assert torch.equal(x[:, 0].long(), y)


@pytest.mark.parametrize("name", ["mlp-mnist1d", "cnn-mnist1d", "gru-mnist1d", "lstm-mnist1d"])
def test_models_output_logits(name):
    model = task_config(name).build_model()
    assert model(torch.randn(5, 40)).shape == (5, 10)


def test_an_rnn_reads_chunk_values_per_step():
    model = task_config("gru-mnist1d", chunk=4, width=8).build_model()
    assert model.rnn.input_size == 4
    x = torch.randn(3, 40)
    seen = []
    model.rnn.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    assert model(x).shape == (3, 10) and seen[0].shape == (3, 10, 4)
    for t in range(10):  # step t reads values 4t .. 4t+3, in order
        assert torch.equal(seen[0][:, t], x[:, 4 * t: 4 * t + 4])
    with pytest.raises(WdstudyError, match="chunk: 3 does not divide the sequence length 40"):
        task_config("gru-mnist1d", chunk=3)
    with pytest.raises(WdstudyError, match="chunk: applies to recurrent tasks on 1-D sequences"):
        task_config("mlp-mnist1d", chunk=4)
    with pytest.raises(WdstudyError, match="chunk: applies to recurrent tasks on 1-D sequences"):
        task_config("gru-mnist", chunk=4)


def test_every_named_task_builds():
    for name in TASKS:
        task = task_config(name)
        shape = task.input_shape
        out = (2,) if task.metric.key == "mse" else (2, 10)  # a regression predicts one number per example
        assert task.build_model()(torch.randn(2, *shape)).shape == out


def test_tasks_pair_classifiers_with_labels_and_linreg_with_curve1d():
    assert {"logreg-mnist1d", "linreg-curve1d", "mlp-mnist1d", "cnn-cifar10"} <= set(TASKS)
    assert not {"cnn-curve1d", "mlp-curve1d", "logreg-curve1d", "linreg-mnist1d", "linreg-cifar10"} & set(TASKS)
    with pytest.raises(WdstudyError, match=r"^name='cnn-curve1d': model 'cnn' does not fit dataset 'curve1d': "
                                           r"curve1d is a regression data set.*use linreg-curve1d$"):
        task_config("cnn-curve1d")
    with pytest.raises(WdstudyError, match=r"^name='linreg-mnist1d': model 'linreg' does not fit dataset 'mnist1d'.*"
                                           r"e\.g\. logreg-mnist1d"):
        task_config("linreg-mnist1d")
    with pytest.raises(WdstudyError, match=r"tasks\.0\.name='mlp-curve1d': model 'mlp' does not fit"):
        from wdstudy.config import validate
        from wdstudy.spec import StudySpec

        validate(StudySpec, {"name": "x", "tasks": ["mlp-curve1d"], "optimizers": ["adam"], "regularizers": ["l2"],
                             "search": {"lr": {"low": 1e-3, "high": 1e-1},
                                        "weight_decay": {"low": 1e-5, "high": 1e-1}, "trials": 2}})
    assert task_config("linreg-curve1d").metric.key == "mse" and task_config("logreg-mnist1d").metric.key == "error"


def test_curve1d_is_generated_deterministically_with_distinct_splits():
    from wdstudy.tasks.data import CURVE1D_FEATURES, curve1d_features, curve1d_points, curve1d_truth

    task = task_config("linreg-curve1d")
    assert (task.epochs, task.batch_size, task.val_fraction) == (80, 10, 0.5)  # the dataset's own defaults ...
    assert task_config("linreg-curve1d", epochs=3).epochs == 3  # ... which a task overrides
    a, b = task.load_data(with_test=True), task.load_data(with_test=True)
    assert (len(a.train), len(a.val), len(a.test)) == (50, 50, 1000)
    for split in ("train", "val", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
        assert sa.x.shape[1:] == (CURVE1D_FEATURES,) and sa.y.dtype == torch.float32
    x, y, xt, yt = curve1d_points(0)
    train, val = split_indices(len(y), 0.5, 0)
    assert torch.equal(a.train.x, curve1d_features(x[train])) and torch.equal(a.train.y, y[train])
    assert torch.equal(a.val.x, curve1d_features(x[val])) and torch.equal(a.test.x, curve1d_features(xt))
    # the train, validation and test points are different points of the same curve
    assert not set(x[train].tolist()) & set(x[val].tolist()) and not set(x.tolist()) & set(xt.tolist())
    assert not torch.equal(curve1d_points(1)[0], x)  # another seed, other points
    assert torch.equal(curve1d_points.__wrapped__(0)[1], y)  # drawn again (not cached): the same points
    noise = y - curve1d_truth(x)
    assert 0.2 < float(noise.std()) < 0.4 and abs(float(noise.mean())) < 0.1  # σ = 0.3 around the curve
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.allclose(curve1d_features(torch.tensor([0.0]))[0, 0], torch.tensor(1.0))  # a bump on each grid point


def test_unknown_names_and_fields_are_errors():
    with pytest.raises(WdstudyError, match="unknown task 'mlp-imagenet'"):
        task_config("mlp-imagenet")
    with pytest.raises(WdstudyError, match="colour=.*unknown key"):
        task_config("mlp-mnist1d", colour="red")
    with pytest.raises(WdstudyError, match="epochs=0"):
        task_config("mlp-mnist1d", epochs=0)


# -- a run's metrics -------------------------------------------------------------------------


@pytest.mark.integration
def test_metrics_and_determinism():
    task = task_config("mlp-mnist1d", epochs=3, width=64)
    a = train_run(task, "adam", "l2", 2e-3, 1e-3, seed=7, with_test=True, accelerator="cpu")
    b = train_run(task, "adam", "l2", 2e-3, 1e-3, seed=7, with_test=True, accelerator="cpu")
    c = train_run(task, "adam", "l2", 2e-3, 1e-3, seed=8, with_test=True, accelerator="cpu")
    skip = {"wall_time_s", "mechanics_overhead"}  # clock readings
    assert {k: v for k, v in a.metrics.items() if k not in skip} == {k: v for k, v in b.metrics.items() if k not in skip}
    assert a.history == b.history
    assert a.metrics["train_loss"] != c.metrics["train_loss"]
    m = a.metrics
    for key in ("train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error"):
        assert m[key] >= 0
    assert m["gap_error"] == pytest.approx(m["test_error"] - m["train_error"])
    assert m["gap_loss"] == pytest.approx(m["test_loss"] - m["train_loss"])
    assert m["penalty"] == pytest.approx(0.5 * 1e-3 * m["weight_norm"] ** 2)
    assert m["steps"] == 3 * 29 and m["epochs"] == 3 and m["device"] == "cpu"
    assert [row["epoch"] for row in a.history] == [0, 1, 2]
    for row in a.history:
        assert {"val_loss", "val_error", "train_loss_running", "train_error_running", "lr", "weight_norm",
                "penalty"} <= set(row)
        assert 0 <= row["train_error_running"] <= 1
    # the final validation metrics are the last epoch's validation pass
    assert a.history[-1]["val_error"] == pytest.approx(m["val_error"])
    # cosine schedule: the learning rate decreases epoch by epoch
    lrs = [row["lr"] for row in a.history]
    assert lrs[0] == pytest.approx(2e-3) and lrs == sorted(lrs, reverse=True)


def test_train_metrics_are_a_full_eval_pass_not_the_running_average():
    task = task_config("mlp-mnist1d", epochs=2, dropout=0.5)
    r = train_run(task, "adam", "none", 1e-3, 0.0, accelerator="cpu")
    # with dropout on during training, the running minibatch loss is worse than the eval pass
    assert r.metrics["train_loss"] < r.history[-1]["train_loss_running"]
    assert r.metrics["penalty"] is None


def test_divergence_raises():
    task = task_config("mlp-mnist1d", epochs=2)
    with pytest.raises(DivergedError, match="training loss is (nan|inf)"):
        train_run(task, "sgd", "none", 1e6, 0.0, schedule="constant", accelerator="cpu")


@pytest.mark.integration
def test_bad_run_arguments():
    task = task_config("mlp-mnist1d", epochs=1)
    with pytest.raises(WdstudyError, match="lr=-0.1"):
        train_run(task, "adam", "l2", -0.1, 1e-3)
    with pytest.raises(WdstudyError, match="weight_decay=-1"):
        train_run(task, "adam", "l2", 0.1, -1)
    with pytest.raises(WdstudyError, match="name='rmsprop'"):
        train_run(task, "rmsprop", "l2", 0.1, 1e-3)
    with pytest.raises(WdstudyError, match="schedule='linear'"):
        train_run(task, "adam", "l2", 0.1, 1e-3, schedule="linear")


@pytest.mark.integration
def test_gradient_clipping_option():
    with pytest.raises(WdstudyError, match="grad_clip=-1"):
        task_config("gru-mnist1d", grad_clip=-1)
    task = task_config("mlp-mnist1d", epochs=1, width=32)
    plain = train_run(task, "adam", "l2", 1e-2, 1e-4, accelerator="cpu")
    clipped = train_run(task.model_copy(update={"grad_clip": 0.01}), "adam", "l2", 1e-2, 1e-4, accelerator="cpu")
    assert clipped.metrics["train_loss"] != plain.metrics["train_loss"]


@pytest.mark.integration
def test_logistic_regression_is_one_linear_layer_and_trains():
    import subprocess
    import sys

    task = task_config("logreg-mnist1d", epochs=5)
    model = task.build_model()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and (linears[0].in_features, linears[0].out_features) == (40, 10)
    assert sum(p.numel() for p in model.parameters()) == 40 * 10 + 10
    r = train_run(task, "adam", "l2", 1e-2, 1e-4, with_test=True, accelerator="cpu")
    assert r.metrics["train_error"] < 0.85 and r.metrics["test_error"] < 0.9  # better than chance (90%)
    help_text = subprocess.run([sys.executable, "-m", "wdstudy", "train", "--help"], capture_output=True,
                               text=True).stdout
    assert "logreg-mnist1d" in help_text


@pytest.mark.integration
def test_linear_regression_trains_with_its_mse_as_the_error():
    from lightning.pytorch import Callback

    from wdstudy.regularizers import split_parameters
    from wdstudy.tasks.data import curve1d_features

    task = task_config("linreg-curve1d")
    model = task.build_model()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and (linears[0].in_features, linears[0].out_features) == (40, 1)
    decay, no_decay = split_parameters(model)
    assert [p.shape for p in decay] == [(1, 40)] and [p.shape for p in no_decay] == [(1,)]  # the bias is not decayed
    data = task.load_data(with_test=True)
    grid = curve1d_features(torch.linspace(0, 1, 400))

    class Predict(Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.inference_mode():
                self.pred = {s: pl_module.model(getattr(data, s).x).double() for s in ("train", "val", "test")}
                self.curve = pl_module.model(grid).double()

    runs = {}
    for lam in (1e-5, 1e-1):
        cb = Predict()
        r = train_run(task, "adam", "l2", 0.1, lam, with_test=True, data=data, callbacks=[cb], accelerator="cpu")
        m = r.metrics
        for s in ("train", "val", "test"):  # the stored error is the mean squared error, as is the loss
            mse = float(((cb.pred[s] - getattr(data, s).y.double()) ** 2).mean())
            assert m[f"{s}_error"] == pytest.approx(mse, rel=1e-6) and m[f"{s}_loss"] == pytest.approx(mse, rel=1e-6)
        assert m["gap_error"] == pytest.approx(m["test_error"] - m["train_error"])
        assert m["steps"] == 80 * 5 and r.history[-1]["val_error"] == pytest.approx(m["val_error"], rel=1e-5)
        assert r.history[-1]["train_error_running"] > 0
        runs[lam] = (m, np.abs(np.diff(cb.curve.numpy())).sum())  # total variation of the fitted curve
    (weak, wiggle_weak), (strong, wiggle_strong) = runs[1e-5], runs[1e-1]
    assert weak["train_error"] < 0.05 < 0.07 < strong["train_error"]  # the weak fit follows the noise (σ² = 0.09)
    assert weak["gap_error"] > 2 * strong["gap_error"] > 0
    assert wiggle_weak > 1.5 * wiggle_strong  # visibly wiggly against smooth
    assert weak["weight_norm"] > strong["weight_norm"]


def test_regression_divergence_is_detected():
    task = task_config("linreg-curve1d", epochs=3)
    with pytest.raises(DivergedError, match="training loss is (nan|inf)"):
        train_run(task, "sgd", "none", 1e6, 0.0, schedule="constant", accelerator="cpu")
