"""What the claims are measured with: the record of a claim, and the two setups of the runs.

:data:`FULL` is what ``python -m wdstudy claims`` runs; :data:`QUICK` (``--quick``) shrinks every
experiment (fewer epochs, λ values and seeds) for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    #: the rotational-equilibrium runs: ``task`` (a normalized net), ``epochs``, ``max_train``, Adam ``lr``,
    #: the decoupled ``lam`` and L2's ``lam_l2``, constant schedule, seed 0
    equilibrium: dict = field(default_factory=dict)
    #: the timescale runs: training-set ``sizes``, decoupled ``lams`` (one grid for every size), ``seeds``,
    #: Adam ``lr`` and ``epochs`` (the same for every size), cosine schedule, the MLP
    timescale: dict = field(default_factory=dict)

    def task(self, name: str = "mlp-mnist1d"):
        from ..tasks import TaskConfig

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
#: a CNN with batch norm after each (bias-free) convolution: its convolutions are scale-invariant, its head
#: is not. ηλ = 5e-3 (τ = 200 steps) against 870 steps; L2's λ = 1e-2 gives a median per-weight shrink
#: η·λ/(√v̂+ε) close to decoupled's η·λ
EQUILIBRIUM = {"task": "cnn-mnist1d", "epochs": 30, "max_train": None, "lr": 5e-3, "lam": 1.0, "lam_l2": 1e-2}
#: MNIST-1D has 4,000 training examples, 400 of them the validation split: 3,600 is all the rest
TIMESCALE = {"sizes": (900, 1800, 3600), "lams": [0.125, 0.25, 0.5, 1.0, 2.0], "seeds": [0, 1],
             "lr": 1e-2, "epochs": 30}
FULL = Setup(epochs=30, seeds=[0, 1, 2], width=128, max_train=None,
             gap_tasks=("mlp-mnist1d", "cnn-mnist1d", "logreg-mnist1d", CURVE_TASK), lams={
                 "l2": [1e-5, 1e-4, 1e-3, 1e-2, 3e-2], "decoupled": [1e-3, 1e-2, 1e-1, 1.0, 3.0],
                 "independent": [1e-6, 1e-5, 1e-4, 1e-3, 3e-3], "l1": [1e-6, 1e-5, 1e-4, 1e-3, 3e-3],
                 "l1-decoupled": [1e-3, 1e-2, 1e-1, 1.0, 3.0]},
             runs={"logreg-mnist1d": {"lr": 1e-2},  # one linear layer: a larger step trains it in 30 epochs
                   CURVE_TASK: {"lr": 0.1, "epochs": None,  # the task's 80 epochs of 5 steps
                                "lams": {"l2": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
                                         "decoupled": [1e-3, 1e-2, 1e-1, 1.0, 3.0]}}},
             equilibrium=EQUILIBRIUM, timescale=TIMESCALE)
QUICK = Setup(epochs=2, seeds=[0, 1], width=32, max_train=600, gap_tasks=("mlp-mnist1d", CURVE_TASK), lams={
    "l2": [1e-4, 1e-2], "decoupled": [1e-2, 1.0], "independent": [1e-5, 1e-3], "l1": [1e-5, 1e-3],
    "l1-decoupled": [1e-2, 1.0]},
    runs={CURVE_TASK: {"lr": 0.1, "epochs": 20, "lams": {"l2": [1e-5, 1e-1], "decoupled": [1e-3, 3.0]}}},
    equilibrium={"task": "cnn-mnist1d", "epochs": 3, "max_train": 600, "lr": 5e-3, "lam": 1.0, "lam_l2": 1e-2},
    timescale={"sizes": (150, 300, 600), "lams": [0.25, 1.0, 4.0], "seeds": [0], "lr": 1e-2, "epochs": 2},
    processes=1)  # a few seconds of runs: starting two processes would cost more

