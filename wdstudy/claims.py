"""What the textbooks claim about weight decay, measured: ``python -m wdstudy claims``.

A fixed set of small experiments (no search) through :func:`wdstudy.train.train_run`, each
answering one claim in one plain sentence with its measured numbers and a verdict —
*holds*, *does not hold*, or *holds only when …*. Writes ``claims.csv``, ``report.html`` and
``report.pdf`` into the output folder (``reports/claims`` by default). ``--quick`` shrinks
every experiment (fewer epochs, λ values and seeds) for tests; the verdict rules are the same.

Most runs train an MLP on MNIST-1D. The λ sweeps also train the two linear models the textbooks
start from: logistic regression on MNIST-1D (``logreg-mnist1d``) and linear regression on a
rich, fixed feature expansion of noisy samples of a smooth curve (``linreg-curve1d``, whose
"error" is the mean squared error); the report draws that regression's fitted curves for the
smallest and the largest λ of each arm over its training points.

The verdict of each row is recomputed from the row's own numbers by :func:`verdict`, so
``claims.csv`` can be checked without re-running anything.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOL = 1e-5  # "equal to float rounding": the largest relative difference of the final weights allowed
SGD = {"name": "sgd", "momentum": 0.0}  # plain SGD (wdstudy's sgd has momentum 0.9 unless told otherwise)


@dataclass
class Claim:
    key: str
    claim: str
    how: str
    numbers: dict[str, float]
    measured: str
    verdict: str = ""
    series: dict = field(default_factory=dict)  # data for the figures


@dataclass
class Setup:
    epochs: int
    seeds: list[int]
    lams: dict[str, list[float]]
    width: int
    max_train: int | None
    gap_tasks: tuple[str, ...]
    #: per task of the sweeps, what differs from the MLP's runs: ``lr`` (Adam; default 1e-3),
    #: ``epochs`` (default: :attr:`epochs`; ``None``: the task's own default) and ``lams``
    runs: dict[str, dict] = field(default_factory=dict)
    #: processes the λ sweeps run in (one torch thread each); 1: in this process
    processes: int = 2

    def task(self, name: str = "mlp-mnist1d"):
        from .tasks import TaskConfig

        width = self.width if name.startswith("mlp") else None  # other backbones keep their default sizes
        epochs = self.runs.get(name, {}).get("epochs", self.epochs)
        return TaskConfig(name=name, width=width, max_train=self.max_train,
                          **({} if epochs is None else {"epochs": epochs}))

    def lr(self, name: str) -> float:
        return self.runs.get(name, {}).get("lr", 1e-3)

    def task_lams(self, name: str) -> dict[str, list[float]]:
        return self.runs.get(name, {}).get("lams", self.lams)


#: the regression task of the sweeps: its fitted curves are drawn over its training points
CURVE_TASK = "linreg-curve1d"
FULL = Setup(epochs=30, seeds=[0, 1, 2], width=128, max_train=None,
             gap_tasks=("mlp-mnist1d", "cnn-mnist1d", "logreg-mnist1d", CURVE_TASK), lams={
                 "l2": [1e-5, 1e-4, 1e-3, 1e-2, 3e-2], "decoupled": [1e-3, 1e-2, 1e-1, 1.0, 3.0],
                 "independent": [1e-6, 1e-5, 1e-4, 1e-3, 3e-3], "l1": [1e-6, 1e-5, 1e-4, 1e-3, 3e-3],
                 "l1-decoupled": [1e-3, 1e-2, 1e-1, 1.0, 3.0]},
             runs={"logreg-mnist1d": {"lr": 1e-2},  # one linear layer: a larger step trains it in 30 epochs
                   CURVE_TASK: {"lr": 0.1, "epochs": None,  # the task's 80 epochs of 5 steps
                                "lams": {"l2": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
                                         "decoupled": [1e-3, 1e-2, 1e-1, 1.0, 3.0]}}})
QUICK = Setup(epochs=2, seeds=[0, 1], width=32, max_train=600, gap_tasks=("mlp-mnist1d", CURVE_TASK), lams={
    "l2": [1e-4, 1e-2], "decoupled": [1e-2, 1.0], "independent": [1e-5, 1e-3], "l1": [1e-5, 1e-3],
    "l1-decoupled": [1e-2, 1.0]},
    runs={CURVE_TASK: {"lr": 0.1, "epochs": 20, "lams": {"l2": [1e-5, 1e-1], "decoupled": [1e-3, 3.0]}}},
    processes=1)  # a few seconds of runs: starting two processes would cost more


# -- instruments ------------------------------------------------------------------------------


@functools.cache
def _callbacks():
    """The instrument classes (defined on first use: importing this module needs no Lightning)."""
    from lightning.pytorch import Callback

    class Capture(Callback):
        """The final weights (all parameters, flattened) and the optimizer's per-weight state."""

        def on_train_end(self, trainer, pl_module):
            import torch

            from .regularizers import split_parameters

            self.weights = torch.cat([p.detach().flatten().double().cpu() for p in pl_module.model.parameters()])
            decay, _ = split_parameters(pl_module.model)
            state = trainer.optimizers[0].state
            self.sqrt_v = [(state[p]["exp_avg_sq"].sqrt().flatten().cpu().numpy(), int(state[p]["step"]))
                           for p in decay if p in state and "exp_avg_sq" in state[p]]
            self.decayed = decay

    class Shrink(Callback):
        """The engineers' rule: multiply every weight (biases included) by ``factor`` after each update."""

        def __init__(self, factor: float):
            self.factor = factor

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            import torch

            with torch.no_grad():
                torch._foreach_mul_([p for p in pl_module.model.parameters() if p.requires_grad], self.factor)

    class Losses(Callback):
        """The training loss of every step (the minibatch's, as the optimizer saw it)."""

        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    class Curve(Callback):
        """The fitted function of a regression: the trained model evaluated at ``inputs`` (features of a grid)."""

        def __init__(self, inputs):
            self.inputs = inputs

        def on_train_end(self, trainer, pl_module):
            import torch

            with torch.inference_mode():
                out = pl_module.model(self.inputs.to(pl_module.device))
            self.values = out.double().cpu().numpy()

    return Capture, Shrink, Losses, Curve


def _run(setup: Setup, optimizer, reg: str, lr: float, wd: float, seed: int = 0, schedule: str = "cosine",
         extra=(), test: bool = False, data=None, decay_all: bool = False, task_name: str = "mlp-mnist1d"):
    from .train import optimizer_config, train_run

    Capture, *_ = _callbacks()
    cap = Capture()
    task = setup.task(task_name)
    opt = optimizer_config(**optimizer) if isinstance(optimizer, dict) else optimizer_config(optimizer)
    result = train_run(task, opt, reg, lr, wd, seed=seed, schedule=schedule, with_test=test, decay_all=decay_all,
                       callbacks=[cap, *extra], data=data, accelerator="cpu")
    return result, cap


def _rel(a, b) -> float:
    """Largest absolute difference of two weight vectors, relative to the largest weight."""
    return float((a - b).abs().max() / b.abs().max())


def _dist(a, b) -> float:
    return float((a - b).norm() / b.norm())


# -- the claims --------------------------------------------------------------------------------


SHORT_STEPS = 10


def _short(setup: Setup):
    """The equivalence claims are about the update: measured over the first ten steps (one epoch of
    1,280 examples), before float32 rounding differences (1e-7 per step) are amplified by training —
    under Adam, a weight whose gradient is ~0 in one run and tiny in the other takes a full-size
    step in one only. Returns the short setup and its data."""
    from dataclasses import replace

    short = replace(setup, epochs=1, max_train=SHORT_STEPS * 128)
    return short, short.task().load_data()


def claim_sgd(setup: Setup, data) -> Claim:
    short, sdata = _short(setup)
    a, ca = _run(short, SGD, "l2", 0.05, 0.01, data=sdata)
    b, cb = _run(short, SGD, "decoupled", 0.05, 0.01, data=sdata)
    rel = _rel(ca.weights, cb.weights)
    nums = {"max_rel_diff": rel, "norm_l2": a.metrics["weight_norm"], "norm_decoupled": b.metrics["weight_norm"]}
    text = (f"after {SHORT_STEPS} steps the largest relative difference of the weights is {rel:.1e} "
            f"(weight norms {a.metrics['weight_norm']:.7f} and {b.metrics['weight_norm']:.7f})")
    if setup.epochs > short.epochs:
        _, la = _run(setup, SGD, "l2", 0.05, 0.01, data=data)
        _, lb = _run(setup, SGD, "decoupled", 0.05, 0.01, data=data)
        nums["max_rel_diff_long"] = _rel(la.weights, lb.weights)
        text += (f"; after {setup.epochs} epochs rounding differences have grown to {nums['max_rel_diff_long']:.1e} "
                 "(float32 trajectories drift apart; the update is the same)")
    return Claim("sgd_equal", "Under plain SGD (no momentum), L2 regularization with λ and decoupled weight decay "
                 "with λ (PyTorch's convention) are the same update.",
                 f"MLP on MNIST-1D, SGD without momentum, lr 0.05, cosine schedule, λ = 0.01, seed 0; weights "
                 f"compared after {SHORT_STEPS} steps (and after {setup.epochs} epochs on the whole training split)",
                 nums, text)


def claim_momentum_adam(setup: Setup, data) -> Claim:
    nums, parts = {}, []
    for name, opt, lr, wd_l2, wd_dec in (("momentum", {"name": "sgd", "momentum": 0.9}, 0.05, 0.01, 0.01),
                                         ("adam", "adam", 1e-3, 1e-3, 1e-3)):
        a, ca = _run(setup, opt, "l2", lr, wd_l2, test=True, data=data)
        b, cb = _run(setup, opt, "decoupled", lr, wd_dec, test=True, data=data)
        nums[f"{name}_distance"] = _dist(ca.weights, cb.weights)
        nums[f"{name}_test_l2"], nums[f"{name}_test_decoupled"] = a.metrics["test_error"], b.metrics["test_error"]
        parts.append(f"{name}: final weights {100 * nums[f'{name}_distance']:.1f}% apart (relative L2 distance), "
                     f"test error {100 * a.metrics['test_error']:.1f}% (L2) vs {100 * b.metrics['test_error']:.1f}% "
                     "(decoupled)")
    return Claim("momentum_adam_differ", "With momentum, and with Adam, L2 and decoupled weight decay with the same "
                 "λ are different updates.",
                 f"MLP on MNIST-1D, SGD momentum 0.9 (lr 0.05, λ 0.01) and Adam (lr 1e-3, λ 1e-3), cosine, "
                 f"{setup.epochs} epochs, seed 0", nums, "; ".join(parts))


def claim_rule_098(setup: Setup, data) -> Claim:
    _, Shrink, *_ = _callbacks()
    nums, parts = {}, []
    short, sdata = _short(setup)
    for name, opt, lr in (("sgd", SGD, 0.05), ("adam", "adam", 1e-3)):
        # "every weight": the rule and the arm act on all parameters, biases included (decay_all)
        _, ref = _run(short, opt, "none", lr, 0.0, schedule="constant", extra=[Shrink(0.98)], data=sdata)
        _, fixed = _run(short, opt, "independent", lr * 0.98, 0.02, schedule="constant", data=sdata, decay_all=True)
        _, plain = _run(short, opt, "independent", lr, 0.02, schedule="constant", data=sdata, decay_all=True)
        nums[f"{name}_corrected"] = _rel(fixed.weights, ref.weights)
        nums[f"{name}_uncorrected"] = _rel(plain.weights, ref.weights)
        parts.append(f"{name}: {nums[f'{name}_corrected']:.1e} with the learning rate scaled by 0.98, "
                     f"{nums[f'{name}_uncorrected']:.1e} without")
    return Claim("rule_098", "Multiplying every weight by 0.98 after each update (w ← 0.98·(w + Δ)) is decoupled "
                 "decay in the schedule-only convention with λ = 0.02 (w ← 0.98·w + Δ) once the learning rate is "
                 "scaled by 0.98 — for SGD and Adam alike.",
                 f"MLP on MNIST-1D, SGD without momentum (lr 0.05) and Adam (lr 1e-3), constant schedule, "
                 f"{SHORT_STEPS} steps, seed 0: `none` + the 0.98 rule on every parameter vs `independent` "
                 "λ = 0.02 on every parameter (decay_all) at 0.98·lr and at lr; largest relative difference of "
                 "the final weights", 
                 nums, "; ".join(parts))


GRID = 400  # points of the grid the regression's fitted curves are drawn on


def _sweeps(setup: Setup, data):
    """Adam runs over each arm's λ values (shared by several claims): every arm on the MLP with one
    seed; L2 and decoupled on every gap task with every seed, each task at its own learning rate.

    The runs are independent: two processes of one torch thread each share them (small models
    train faster so than one process with two threads), unless the setup asks for one process.
    Returns the runs' numbers (one row per run) and, for the regression task, its fitted curves on
    a grid over [0, 1]: ``{(arm, λ, seed): values}``.
    """
    import pandas as pd
    import torch

    from .tasks.data import curve1d_points, curve1d_truth, split_indices

    grid = torch.linspace(0.0, 1.0, GRID)
    task = setup.task(CURVE_TASK)
    x, y, _, _ = curve1d_points()
    train = split_indices(len(y), task.val_fraction, task.split_seed)[0][: task.max_train]  # load_data's train split
    jobs = [(task, reg, lam, seed)
            for task in setup.gap_tasks
            for reg, lams in setup.task_lams(task).items() if task == "mlp-mnist1d" or reg in ("l2", "decoupled")
            for lam in lams
            for seed in (setup.seeds if reg in ("l2", "decoupled") else setup.seeds[:1])]
    if setup.processes > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(setup.processes, mp_context=mp.get_context("spawn"),
                                 initializer=_sweep_init, initargs=(setup,)) as pool:
            done = list(pool.map(_sweep_run, jobs))
    else:
        _SWEEP.update(setup=setup, data={"mlp-mnist1d": data})
        done = [_sweep_run(job) for job in jobs]
    rows = [row for row, _ in done]
    curves = {(r["arm"], r["lam"], r["seed"]): values for r, values in done if values is not None}
    return pd.DataFrame(rows), {"grid": grid.numpy().astype(float), "truth": curve1d_truth(grid).numpy().astype(float),
                                "x": x[train].numpy().astype(float), "y": y[train].numpy().astype(float),
                                "fits": curves}


_SWEEP: dict = {}  # per process: the setup and the data of the sweeps' runs


def _sweep_init(setup: Setup) -> None:
    import torch

    from .train import quiet_lightning

    torch.set_num_threads(1)
    quiet_lightning()
    _SWEEP.update(setup=setup, data={})


def _sweep_run(job) -> tuple[dict, object]:
    """One run of the λ sweeps: its row of numbers and, for the regression, its fitted curve."""
    import torch

    from .tasks.data import curve1d_features

    task, reg, lam, seed = job
    setup, data = _SWEEP["setup"], _SWEEP["data"]
    key = "mlp-mnist1d" if task.endswith("-mnist1d") else task  # one MNIST-1D split for every classifier
    if key not in data:
        data[key] = setup.task(key).load_data(with_test=True)
    *_, Curve = _callbacks()
    curve = [Curve(curve1d_features(torch.linspace(0.0, 1.0, GRID)))] if task == CURVE_TASK else []
    r, _ = _run(setup, "adam", reg, setup.lr(task), lam, seed=seed, test=True, data=data[key], task_name=task,
                extra=curve)
    row = {"task": task, "arm": reg, "lam": lam, "seed": seed, **{k: r.metrics[k] for k in (
        "weight_norm", "gap_error", "test_error", "train_error", "zero_fraction")}}
    return row, (curve[0].values if curve else None)


#: how the claims' text names a task of the sweeps
TASK_TEXT = {"mlp-mnist1d": "MLP on MNIST-1D", "cnn-mnist1d": "CNN on MNIST-1D",
             "logreg-mnist1d": "logistic regression on MNIST-1D",
             CURVE_TASK: "linear regression on 40 fixed RBF features of 50 noisy samples of a smooth curve"}


def _tasks_text(setup: Setup, tasks) -> str:
    """``MLP on MNIST-1D (Adam lr 0.001, 30 epochs), ...`` for the tasks of a sweep."""
    out = []
    for t in tasks:
        task = setup.task(t)
        data, batches = ("curve1d; ", f", batches of {task.batch_size}") if t == CURVE_TASK else ("", "")
        out.append(f"{TASK_TEXT.get(t, t)} ({data}Adam lr {setup.lr(t):g}, {task.epochs} epochs{batches})")
    return ", ".join(out)


def _gap_text(task: str, x: float) -> str:
    """A gap in the task's metric: ``+11.0 pts`` (error rate) or ``+0.139 MSE``."""
    from .tasks.names import task_metric

    return f"{100 * x:+.1f} pts" if task_metric(task).is_rate else f"{x:+.3f} MSE"


def claim_norm(sw, setup: Setup) -> Claim:
    nums, parts, series = {}, [], {}
    first = sw[sw.seed == sw.seed.min()]
    for task in dict.fromkeys(first.task):
        for arm, g in first[first.task == task].groupby("arm", sort=False):
            key = arm if task == "mlp-mnist1d" else f"{task}/{arm}"  # every arm on the MLP; L2 and decoupled elsewhere
            m = g.groupby("lam").weight_norm.mean()
            nums[f"{key}_monotone"] = float(bool(np.all(np.diff(m.to_numpy()) < 0)))
            nums[f"{key}_ratio"] = float(m.iloc[-1] / m.iloc[0])
            series[key] = m
            parts.append(f"{key}: ‖w‖ {m.iloc[0]:.3g} → {m.iloc[-1]:.3g} over λ {m.index[0]:.0e}–{m.index[-1]:.0e}"
                         f"{'' if nums[f'{key}_monotone'] else ' (not monotone)'}")
    others = [t for t in dict.fromkeys(first.task) if t != "mlp-mnist1d"]
    return Claim("norm_vs_lambda", "A larger λ gives smaller weights.",
                 f"{_tasks_text(setup, ['mlp-mnist1d'])}, cosine, seed 0, each arm over its own λ values"
                 + (f"; L2 and decoupled also on {_tasks_text(setup, others)}" if others else "")
                 + "; norm of the regularized weights at the end", nums, "; ".join(parts), series={"norm": series})


def claim_gap(sw, setup: Setup, curves: dict) -> Claim:
    from scipy.stats import spearmanr

    from .stats import mean_ci

    nums, parts, series = {}, [], {}
    for task in dict.fromkeys(sw.task):
        for arm in ("l2", "decoupled"):
            g = sw[(sw.task == task) & (sw.arm == arm)]
            stats = {lam: mean_ci(x.gap_error.to_numpy()) for lam, x in g.groupby("lam")}
            means = np.array([st.mean for st in stats.values()])
            rho = spearmanr(g.lam, g.gap_error)
            key = f"{task}/{arm}"
            nums[f"{key}_monotone"] = float(bool(np.all(np.diff(means) < 0)))
            nums[f"{key}_rho"], nums[f"{key}_p"] = float(rho.statistic), float(rho.pvalue)
            nums[f"{key}_change"] = float(means[-1] - means[0])
            series[key] = stats
            parts.append(f"{task} {arm}: gap {_gap_text(task, means[0])} → {_gap_text(task, means[-1])} from the "
                         f"smallest to the largest λ, Spearman ρ = {rho.statistic:+.2f} (p = {rho.pvalue:.2g})"
                         f"{'' if nums[f'{key}_monotone'] else ', not monotone'}")
    tasks = list(dict.fromkeys(sw.task))
    return Claim("gap_vs_lambda", "A larger λ gives a smaller generalization gap.",
                 f"{_tasks_text(setup, tasks)}; cosine schedule, each λ with seeds {setup.seeds}; gap = test − train "
                 "error at the end (for the regression: test − train mean squared error); Spearman's ρ of λ against "
                 "the per-seed gaps", nums, "; ".join(parts),
                 series={"gap": series, "curves": curves, "sweeps": sw})


def claim_zeros(setup: Setup, data) -> Claim:
    nums, parts, series = {}, [], {}
    lams = setup.lams["l1-decoupled"]
    for arm, wd in (("l1-decoupled", lams), ("l1", [x * 1e-3 for x in lams]), ("l2", [x * 1e-2 for x in lams])):
        zs = []
        for lam in wd:
            r, _ = _run(setup, SGD, arm, 0.05, lam, data=data)
            zs.append(r.metrics["zero_fraction"])
        nums[f"{arm}_max_zero_fraction"] = float(max(zs))
        series[arm] = dict(zip(wd, zs))
        parts.append(f"{arm}: at most {100 * max(zs):.1f}% exact zeros")
    return Claim("l1_zeros", "The L1 penalty sets some weights exactly to zero; L2 does not.",
                 "MLP on MNIST-1D, plain SGD lr 0.05, cosine; the fraction of regularized weights that are exactly 0 "
                 "at the end, over a λ sweep per arm (L1 as a gradient term, L1 as a soft threshold, L2)",
                 nums, "; ".join(parts), series={"zeros": series})


def claim_faster(setup: Setup, data) -> Claim:
    _, _, Losses, _ = _callbacks()
    steps = {"none": [], "decoupled": []}
    for arm, lam in (("none", 0.0), ("decoupled", 0.1)):
        for seed in setup.seeds:
            cb = Losses()
            _run(setup, "adam", arm, 1e-3, lam, seed=seed, extra=[cb], data=data)
            steps[arm].append(np.asarray(cb.losses))
    # the threshold: the lowest smoothed loss that every run of both arms reaches (so none is censored)
    k = max(1, min(20, min(len(s) for v in steps.values() for s in v) // 4))
    target = max(float(_smooth(s, k).min()) for v in steps.values() for s in v)
    reach = {arm: [int(np.argmax(_smooth(s, k) <= target)) + k for s in v] for arm, v in steps.items()}
    nums = {"target_loss": target, "steps_none": float(np.mean(reach["none"])),
            "steps_decoupled": float(np.mean(reach["decoupled"]))}
    return Claim("converge_faster", "Weight decay makes training converge faster.",
                 f"MLP on MNIST-1D, Adam lr 1e-3, cosine, seeds {setup.seeds}: steps until the training loss "
                 f"(moving average of {k} steps) first reaches {target:.3f} — the lowest level every run reaches — "
                 "without decay and with decoupled λ = 0.1",
                 nums, f"{nums['steps_none']:.0f} steps without decay, {nums['steps_decoupled']:.0f} with "
                 "(mean over seeds)")


def _smooth(x: np.ndarray, k: int = 20) -> np.ndarray:
    if len(x) < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def claim_adam_v(setup: Setup, data) -> Claim:
    nums, series = {}, {}
    lr, lam = 1e-3, 1e-3
    for arm in ("l2", "decoupled"):
        _, cap = _run(setup, "adam", arm, lr, lam, data=data)
        sv = np.concatenate([s for s, _ in cap.sqrt_v])
        step = cap.sqrt_v[0][1]
        v_hat = sv / math.sqrt(1 - 0.999 ** step)  # bias-corrected √v, as Adam divides by
        # the per-step relative shrink each weight gets from the regularizer
        shrink = lr * lam / (v_hat + 1e-8) if arm == "l2" else np.full_like(v_hat, lr * lam)
        lo, hi = np.quantile(v_hat, [0.1, 0.9])
        ratio = float(shrink[v_hat >= hi].mean() / shrink[v_hat <= lo].mean())
        nums[f"{arm}_ratio"] = ratio
        series[arm] = (v_hat, shrink)
    return Claim("adam_sqrt_v", "Under Adam, L2 regularizes weights with a large gradient history (large √v) less "
                 "than decoupled decay does.",
                 "MLP on MNIST-1D, Adam lr 1e-3, λ 1e-3, cosine, seed 0: per weight, the relative shrink per step the "
                 "regularizer applies at the end of training — η·λ/(√v̂+ε) for L2, η·λ for decoupled — against √v̂; "
                 "summary: mean shrink of the 10% of weights with the largest √v̂ over that of the 10% with the "
                 "smallest", nums,
                 f"L2: the large-√v̂ weights shrink {nums['l2_ratio']:.2g}× as fast as the small-√v̂ ones; decoupled: "
                 f"{nums['decoupled_ratio']:.2g}×", series={"adam_v": series})


# -- verdicts ----------------------------------------------------------------------------------


def verdict(key: str, n: dict[str, float]) -> str:
    """The verdict of a claim from its numbers alone (so claims.csv can be re-checked)."""
    if key == "sgd_equal":
        return "holds" if n["max_rel_diff"] <= TOL else "does not hold"
    if key == "momentum_adam_differ":
        return "holds" if min(n["momentum_distance"], n["adam_distance"]) > 100 * TOL else "does not hold"
    if key == "rule_098":
        corrected = max(n["sgd_corrected"], n["adam_corrected"]) <= TOL
        uncorrected = min(n["sgd_uncorrected"], n["adam_uncorrected"]) > TOL
        return ("holds only when the learning rate is scaled by 0.98" if corrected and uncorrected
                else "holds" if corrected else "does not hold")
    if key == "gap_vs_lambda":
        arms = [k[: -len("_monotone")] for k in n if k.endswith("_monotone")]
        mono = [a for a in arms if n[f"{a}_monotone"]]
        trend = [a for a in arms if not n[f"{a}_monotone"] and n[f"{a}_rho"] < 0 and n[f"{a}_p"] < 0.05]
        if len(mono) == len(arms):
            return "holds"
        if len(mono) + len(trend) == len(arms):
            return ((f"holds for {', '.join(mono)}; " if mono else "") +
                    f"only as a trend (negative ρ, p < 0.05, not monotone) for {', '.join(trend)}")
        rest = [a for a in arms if a not in mono and a not in trend]
        if not (mono or trend):
            return "does not hold"
        if not trend:
            return f"holds only for {', '.join(mono)} (not for {', '.join(rest)})"
        return ((f"holds only for {', '.join(mono)}, and " if mono else "holds only ")
                + f"as a trend (negative ρ, p < 0.05, not monotone) for {', '.join(trend)} "
                f"(not for {', '.join(rest)})")
    if key == "norm_vs_lambda":
        mono = {k[: -len("_monotone")]: v for k, v in n.items() if k.endswith("_monotone")}
        if all(mono.values()):
            return "holds"
        ok = [a for a, v in mono.items() if v]
        if not ok:
            return "does not hold"
        return f"holds only for {', '.join(ok)} (not for {', '.join(a for a, v in mono.items() if not v)})"
    if key == "l1_zeros":
        l1 = n["l1-decoupled_max_zero_fraction"] > 0
        l2 = n["l2_max_zero_fraction"] == 0
        if l1 and l2:
            return ("holds only when L1 acts as a soft threshold (the gradient form leaves no exact zeros)"
                    if n["l1_max_zero_fraction"] == 0 else "holds")
        return "does not hold"
    if key == "converge_faster":
        if n["steps_decoupled"] < n["steps_none"]:
            return "holds"
        return "does not hold" if n["steps_decoupled"] > n["steps_none"] else "does not hold (the same number of steps)"
    if key == "adam_sqrt_v":
        return "holds" if n["l2_ratio"] < 0.5 and abs(n["decoupled_ratio"] - 1) < 1e-9 else "does not hold"
    raise KeyError(key)


# -- the report ----------------------------------------------------------------------------------


def run_claims(out_dir: Path, quick: bool = False, log=print) -> list[Claim]:
    setup = QUICK if quick else FULL
    data = setup.task().load_data(with_test=True)  # one MNIST-1D split for every run (the CNN's too)
    t0 = time.perf_counter()
    claims = []
    for fn in (claim_sgd, claim_momentum_adam, claim_rule_098):
        claims.append(fn(setup, data))
        log(f"[{time.perf_counter() - t0:5.1f} s] {claims[-1].key}")
    sw, curves = _sweeps(setup, data)
    log(f"[{time.perf_counter() - t0:5.1f} s] λ sweeps")
    claims += [claim_norm(sw, setup), claim_gap(sw, setup, curves)]
    for fn in (claim_zeros, claim_faster, claim_adam_v):
        claims.append(fn(setup, data))
        log(f"[{time.perf_counter() - t0:5.1f} s] {claims[-1].key}")
    for c in claims:
        c.verdict = verdict(c.key, c.numbers)
    write(out_dir, claims, quick, time.perf_counter() - t0)
    return claims


def write(out_dir: Path, claims: list[Claim], quick: bool, seconds: float) -> None:
    import json

    import pandas as pd

    from .report.document import DocumentHeader, Para, Section, Table
    from .report.html import render_html
    from .report.pdf import render_pdf

    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"key": c.key, "claim": c.claim, "how": c.how, "measured": c.measured, "verdict": c.verdict,
                   "numbers": json.dumps(c.numbers)} for c in claims]).to_csv(out_dir / "claims.csv", index=False)
    figs = [_figure(claims)] + ([_curves_figure(claims)] if _has_curves(claims) else [])
    head = DocumentHeader("claims", "What the textbooks claim about weight decay, measured",
                          f"Measured by `python -m wdstudy claims{' --quick' if quick else ''}` on "
                          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: small training runs "
                          "through wdstudy.train.train_run on MNIST-1D and curve1d, no search, no storage.")
    sections = [
        Section("claims", "1. Claims and verdicts", [
            Para(f"Each claim was tested by small training runs{' (--quick: fewer epochs, λ values and seeds)' if quick else ''}"
                 f", {seconds:.0f} s in all. A verdict is computed from the numbers in its row by "
                 "wdstudy.claims.verdict; claims.csv holds them."),
            Table("claims", ["claim", "verdict", "measured", "how it was tested"],
                  [[c.claim, c.verdict, c.measured, c.how] for c in claims], [3.2, 1.6, 3.2, 3.0])]),
        Section("figures", "2. Measurements", figs),
    ]
    (out_dir / "report.html").write_text(render_html(head, sections))
    render_pdf(head, sections, out_dir / "report.pdf")


def _figure(claims: list[Claim]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report.figures import WIDTH, Rendered, figure_bytes
    from .report.style import color, label
    from .tasks.names import task_metric

    by = {c.key: c for c in claims}
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 5.6))
    ax = axes[0][0]
    for arm, m in by["norm_vs_lambda"].series["norm"].items():
        if "/" in arm:
            continue  # the linear tasks' norms are in the table
        ax.plot(m.index, m.to_numpy(), "o-", color=color(arm), label=label(arm), ms=3)
    ax.set(xscale="log", xlabel="λ (each arm in its own convention)", ylabel="‖w‖₂ at the end",
           title="weight norm against λ")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    styles = {"mlp": "-", "cnn": "--", "logreg": ":"}
    for key, stats in by["gap_vs_lambda"].series["gap"].items():
        task, arm = key.split("/")
        if not task_metric(task).is_rate:
            continue  # a regression's gap is in MSE: drawn beside its fitted curves
        lams = list(stats)
        mean = np.array([100 * stats[x].mean for x in lams])
        lo = np.array([100 * (stats[x].low if not math.isnan(stats[x].low) else stats[x].mean) for x in lams])
        hi = np.array([100 * (stats[x].high if not math.isnan(stats[x].high) else stats[x].mean) for x in lams])
        model = task.split("-")[0]
        ax.plot(lams, mean, "o" + styles.get(model, "-."), color=color(arm), label=f"{model} {label(arm)}", ms=3)
        ax.fill_between(lams, lo, hi, color=color(arm), alpha=0.12, lw=0)
    ax.set(xscale="log", xlabel="λ", ylabel="gap: test − train error (points)", title="generalization gap against λ")
    ax.legend(fontsize=6.5, ncol=2)
    ax = axes[1][0]
    for arm, zs in by["l1_zeros"].series["zeros"].items():
        ax.plot(list(zs), [100 * z for z in zs.values()], "o-", color=color(arm), label=label(arm), ms=3)
    ax.set(xscale="log", xlabel="λ", ylabel="exactly-zero weights (%)", title="exact zeros (plain SGD)")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for arm, (v, s) in by["adam_sqrt_v"].series["adam_v"].items():
        idx = np.random.default_rng(0).choice(len(v), size=min(3000, len(v)), replace=False)
        ax.scatter(v[idx], s[idx], s=2, color=color(arm), label=label(arm), alpha=0.5)
    ax.set(xscale="log", yscale="log", xlabel="√v̂ of the weight (Adam)", ylabel="relative shrink per step",
           title="who gets regularized under Adam")
    ax.legend(fontsize=7, markerscale=4)
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    png, pdf = figure_bytes(fig, pdf_dpi="figure")
    return Rendered("claims", "figures", "Measurements behind the claims", (
        "Top left: norm of the regularized weights of the MLP at the end against λ, per arm (Adam). Top right: "
        "generalization gap (test − train error) against λ for the classifiers on MNIST-1D — MLP, CNN and "
        "logistic regression — mean with 95% interval over seeds. Bottom left: share of exactly-zero regularized weights "
        "against λ under plain SGD (L1 as a soft threshold, L1 as a gradient term at λ/1000, L2 at λ/100). Bottom "
        "right: per weight, the relative shrink per step its regularizer applies under Adam against √v̂: L2's "
        "falls as 1/√v̂, decoupled decay's is the same for every weight."),
        "Four panels: weight norm, gap, exact zeros against λ, and per-weight shrink against √v under Adam.",
        png, pdf)


def _has_curves(claims: list[Claim]) -> bool:
    gap = next((c for c in claims if c.key == "gap_vs_lambda"), None)
    return gap is not None and bool(gap.series.get("curves", {}).get("fits"))


def _curves_figure(claims: list[Claim]):
    """The regression's fitted curves for the smallest and the largest λ of each arm over its
    training points, and its gap (in MSE) against λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report.figures import WIDTH, Rendered, figure_bytes
    from .report.style import color, label

    gap = next(c for c in claims if c.key == "gap_vs_lambda")
    cv, sw = gap.series["curves"], gap.series["sweeps"]
    sw = sw[sw.task == CURVE_TASK]
    seed = int(sw.seed.min())
    arms = [a for a in ("l2", "decoupled") if (sw.arm == a).any()]
    fig, axes = plt.subplots(1, len(arms) + 1, figsize=(WIDTH, 3.5),
                             gridspec_kw={"width_ratios": [1.25] * len(arms) + [1]})
    lo_y, hi_y = float(np.min(cv["y"])), float(np.max(cv["y"]))
    pad = 0.25 * (hi_y - lo_y)
    for ax, arm in zip(axes, arms):
        ax.plot(cv["grid"], cv["truth"], color="black", lw=0.9, ls="--", label="true curve", zorder=2)
        ax.scatter(cv["x"], cv["y"], s=7, color="black", zorder=3, label=f"{len(cv['x'])} training points")
        lams = sorted(sw[sw.arm == arm].lam.unique())
        for lam, lw, alpha in ((lams[0], 1.0, 0.75), (lams[-1], 2.2, 1.0)):
            r = sw[(sw.arm == arm) & (sw.lam == lam) & (sw.seed == seed)].iloc[0]
            ax.plot(cv["grid"], cv["fits"][(arm, lam, seed)], color=color(arm), lw=lw, alpha=alpha, zorder=4,
                    label=f"λ = {lam:.0e}: train MSE {r.train_error:.3f}, test {r.test_error:.3f}")
        ax.set(ylim=(lo_y - pad, hi_y + pad), xlabel="x", title=f"{label(arm)}: smallest and largest λ")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    axes[0].set_ylabel("y")
    ax = axes[-1]
    for arm in arms:
        stats = gap.series["gap"][f"{CURVE_TASK}/{arm}"]
        lams = list(stats)
        mean = np.array([stats[x].mean for x in lams])
        low = np.array([stats[x].low if not math.isnan(stats[x].low) else stats[x].mean for x in lams])
        high = np.array([stats[x].high if not math.isnan(stats[x].high) else stats[x].mean for x in lams])
        ax.plot(lams, mean, "o-", color=color(arm), label=label(arm), ms=3)
        ax.fill_between(lams, low, high, color=color(arm), alpha=0.12, lw=0)
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xscale="log", xlabel="λ", ylabel="gap: test − train MSE", title="gap against λ (MSE)")
    ax.legend(fontsize=7, loc="lower left")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    png, pdf = figure_bytes(fig, pdf_dpi="figure")
    return Rendered("curves", "figures", "A linear regression with a rich feature expansion, weakly and strongly "
                    "regularized", (
        f"linreg-curve1d: 40 fixed Gaussian RBF features of x, one linear layer, mean squared error, Adam "
        f"(seed {seed}). Left panels, one per arm: the fitted curve at the smallest λ of the sweep (thin) follows "
        "the noise between the training points (black dots; dashed: the curve they were drawn around, "
        "sin(2πx) + x/2, noise σ = 0.3); at the largest λ (thick) it is smooth and shrunk towards the mean. "
        "Each label gives the fit's train and test MSE (1,000 test points; the noise alone costs 0.09). "
        "Right: the generalization gap in MSE (test − train) against λ, each arm in its own convention, mean with "
        "95% interval over seeds."),
        "Fitted curves of a linear regression on RBF features for a small and a large λ per arm over the "
        "training points, and the gap in MSE against λ.", png, pdf)
