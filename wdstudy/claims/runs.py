"""The runs behind the claims: instruments on the training run, one run, and the λ sweeps.

Every run goes through :func:`wdstudy.train.train_run` on the CPU; the instruments are Lightning
callbacks that record what a claim needs (the final weights and Adam's state, every step's loss,
a regression's fitted curve) or change the update (the engineers' 0.98 rule). The λ sweeps'
runs are independent: :func:`sweeps` shares them between spawned processes.
"""

from __future__ import annotations

import functools

from .setup import CURVE_TASK, Setup

#: the equivalence claims are measured over this many steps (:func:`short_setup`)
SHORT_STEPS = 10
GRID = 400  # points of the grid the regression's fitted curves are drawn on


@functools.cache
def instruments():
    """The instrument classes (defined on first use: importing this module needs no Lightning)."""
    from lightning.pytorch import Callback

    class Capture(Callback):
        """The final weights (all parameters, flattened) and the optimizer's per-weight state."""

        def on_train_end(self, trainer, pl_module):
            import torch

            from ..regularizers import split_parameters

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


def run(setup: Setup, optimizer, reg: str, lr: float, wd: float, seed: int = 0, schedule: str = "cosine",
         extra=(), test: bool = False, data=None, decay_all: bool = False, task_name: str = "mlp-mnist1d"):
    from ..train import optimizer_config, train_run

    Capture, *_ = instruments()
    cap = Capture()
    task = setup.task(task_name)
    opt = optimizer_config(**optimizer) if isinstance(optimizer, dict) else optimizer_config(optimizer)
    result = train_run(task, opt, reg, lr, wd, seed=seed, schedule=schedule, with_test=test, decay_all=decay_all,
                       callbacks=[cap, *extra], data=data, accelerator="cpu")
    return result, cap


def rel_diff(a, b) -> float:
    """Largest absolute difference of two weight vectors, relative to the largest weight."""
    return float((a - b).abs().max() / b.abs().max())


def distance(a, b) -> float:
    return float((a - b).norm() / b.norm())


def short_setup(setup: Setup):
    """The equivalence claims are about the update: measured over the first ten steps (one epoch of
    1,280 examples), before float32 rounding differences (1e-7 per step) are amplified by training —
    under Adam, a weight whose gradient is ~0 in one run and tiny in the other takes a full-size
    step in one only. Returns the short setup and its data."""
    from dataclasses import replace

    short = replace(setup, epochs=1, max_train=SHORT_STEPS * 128)
    return short, short.task().load_data()


def sweeps(setup: Setup, data):
    """Adam runs over each arm's λ values (shared by several claims): every arm on the MLP with one
    seed; L2 and decoupled on every gap task with every seed, each task at its own learning rate.

    The runs are independent: two processes of one torch thread each share them (small models
    train faster so than one process with two threads), unless the setup asks for one process.
    Returns the runs' numbers (one row per run) and, for the regression task, its fitted curves on
    a grid over [0, 1]: ``{(arm, λ, seed): values}``.
    """
    import pandas as pd
    import torch

    from ..tasks.data import curve1d_points, curve1d_truth, split_indices

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
                                 initializer=_sweep_init) as pool:
            done = list(pool.map(functools.partial(_sweep_in_process, setup), jobs))
    else:
        loaded = {"mlp-mnist1d": data}
        done = [_sweep_run(setup, loaded, job) for job in jobs]
    rows = [row for row, _ in done]
    curves = {(r["arm"], r["lam"], r["seed"]): values for r, values in done if values is not None}
    return pd.DataFrame(rows), {"grid": grid.numpy().astype(float), "truth": curve1d_truth(grid).numpy().astype(float),
                                "x": x[train].numpy().astype(float), "y": y[train].numpy().astype(float),
                                "fits": curves}


#: in a process of the sweeps: the data sets it has loaded, by task (each is loaded once per process)
_LOADED: dict = {}


def _sweep_init() -> None:
    import torch

    from ..train import quiet_lightning

    torch.set_num_threads(1)
    quiet_lightning()


def _sweep_in_process(setup: Setup, job) -> tuple[dict, object]:
    return _sweep_run(setup, _LOADED, job)


def _sweep_run(setup: Setup, data: dict, job) -> tuple[dict, object]:
    """One run of the λ sweeps: its row of numbers and, for the regression, its fitted curve.
    ``data``: the data sets loaded so far, by task (a run adds the one it loads)."""
    import torch

    from ..tasks.data import curve1d_features

    task, reg, lam, seed = job
    key = "mlp-mnist1d" if task.endswith("-mnist1d") else task  # one MNIST-1D split for every classifier
    if key not in data:
        data[key] = setup.task(key).load_data(with_test=True)
    *_, Curve = instruments()
    curve = [Curve(curve1d_features(torch.linspace(0.0, 1.0, GRID)))] if task == CURVE_TASK else []
    r, _ = run(setup, "adam", reg, setup.lr(task), lam, seed=seed, test=True, data=data[key], task_name=task,
               extra=curve)
    row = {"task": task, "arm": reg, "lam": lam, "seed": seed, **{k: r.metrics[k] for k in (
        "weight_norm", "gap_error", "test_error", "train_error", "zero_fraction")}}
    return row, (curve[0].values if curve else None)


def mechanics_runs(setup: Setup, data) -> tuple[list[dict], list[dict]]:
    """The runs of the two mechanics claims, in one pool (as :func:`sweeps`'): the rotational-equilibrium
    runs (Adam + decoupled and Adam + L2 on :attr:`Setup.equilibrium`'s normalized net, each with its
    per-layer mechanics table) and the timescale runs (:attr:`Setup.timescale`: decoupled on the MLP, every
    size × λ × seed). Returns each list of rows, in the order of its jobs."""
    eq, ts = setup.equilibrium, setup.timescale
    jobs = [("equilibrium", {"name": eq["task"], "batch_norm": True, "epochs": eq["epochs"],
                             "max_train": eq["max_train"]}, arm, eq["lr"], lam, 0, "constant")
            for arm, lam in (("decoupled", eq["lam"]), ("l2", eq["lam_l2"]))]
    jobs += [("timescale", {"name": "mlp-mnist1d", "width": setup.width, "epochs": ts["epochs"], "max_train": n},
              "decoupled", ts["lr"], lam, seed, "cosine")
             for n in ts["sizes"] for lam in ts["lams"] for seed in ts["seeds"]]
    if setup.processes > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(setup.processes, mp_context=mp.get_context("spawn"),
                                 initializer=_sweep_init) as pool:
            done = list(pool.map(_mechanics_in_process, jobs))
    else:
        loaded = {} if data is None else {("mlp-mnist1d", setup.max_train): data}
        done = [_mechanics_run(loaded, job) for job in jobs]
    return [r for j, r in zip(jobs, done) if j[0] == "equilibrium"], [r for j, r in zip(jobs, done) if j[0] == "timescale"]


def _mechanics_in_process(job) -> dict:
    return _mechanics_run(_LOADED, job)


def _mechanics_run(data: dict, job) -> dict:
    """One run of :func:`mechanics_runs`: its setting, final metrics and (equilibrium runs) mechanics table.
    ``data``: the data sets loaded so far, by (task, max_train); every MNIST-1D task shares one split."""
    from ..tasks import TaskConfig
    from ..train import optimizer_config, train_run

    kind, fields, arm, lr, lam, seed, schedule = job
    task = TaskConfig(**fields)
    key = ("mlp-mnist1d", task.max_train)
    if key not in data:
        data[key] = task.load_data(with_test=True)
    r = train_run(task, optimizer_config("adam"), arm, lr, lam, seed=seed, schedule=schedule, with_test=True,
                  data=data[key], accelerator="cpu")
    row = {"kind": kind, "task": task.name, "train_size": len(data[key].train), "arm": arm, "lr": lr, "lam": lam,
           "seed": seed, **{k: r.metrics[k] for k in ("test_error", "train_error", "steps_per_epoch", "tau_epoch",
                                                       "run_epochs", "steps")}}
    if kind == "equilibrium":
        row["mechanics"] = r.mechanics
    return row
