"""Names and shapes of the built-in backbones and datasets, and what their metrics measure
(plain data, no torch).

Kept apart from the data loaders and the backbones so that validating a spec, reading a
storage or drawing a report never imports torch.

Two kinds of task exist. **Classification** (the backbones of :data:`CLASSIFIERS` on the
datasets of :data:`CLASSIFICATION`): cross-entropy loss, and the stored ``*_error`` metrics
are error rates. **Regression** (:data:`REGRESSORS` on :data:`REGRESSION`): mean-squared-error
loss, and the stored ``*_error`` metrics are the MSE, so the search objective ``val_error``,
the race, the evaluation and the gap (test − train) work unchanged. :func:`task_metric` says
which a task's ``*_error`` columns hold; the report and the command line label them by it.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASSIFIERS = ("mlp", "cnn", "gru", "lstm", "logreg")
REGRESSORS = ("linreg",)
MODELS = CLASSIFIERS + REGRESSORS
CLASSIFICATION = ("mnist1d", "mnist", "fashionmnist", "cifar10")
REGRESSION = ("curve1d",)
DATASETS = CLASSIFICATION + REGRESSION

#: curve1d: each point x in [0, 1] is expanded into this many Gaussian RBF features.
CURVE1D_FEATURES = 40

#: Shape of one input example (without the batch dimension), per dataset.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist1d": (40,),
    "mnist": (1, 28, 28),
    "fashionmnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "curve1d": (CURVE1D_FEATURES,),
}
NUM_CLASSES = 10

#: Examples per dataset that the train and validation splits are carved from: MNIST-1D's 4000
#: generated training sequences, curve1d's :data:`~.data.CURVE1D_POINTS`, and the full training
#: sets of the datasets read from files (torchvision's layout: 60,000 images for MNIST and
#: Fashion-MNIST, 50,000 for CIFAR-10). A task's training-set size, and so its steps per epoch,
#: follows from these and its fields alone (:attr:`wdstudy.tasks.TaskConfig.train_size`).
SPLIT_POOL: dict[str, int] = {"mnist1d": 4000, "mnist": 60000, "fashionmnist": 60000, "cifar10": 50000, "curve1d": 100}


def fits(model: str, dataset: str) -> bool:
    """Whether backbone ``model`` can be trained on ``dataset``: classifiers on class labels,
    regressors on real-valued targets."""
    return (model in CLASSIFIERS and dataset in CLASSIFICATION) or (model in REGRESSORS and dataset in REGRESSION)


def misfit(model: str, dataset: str) -> str:
    """Why ``model-dataset`` is not a task (both names known, but they do not fit together)."""
    if dataset in REGRESSION:
        kind, use = "a regression data set (real-valued targets, mean squared error)", REGRESSORS
    else:
        kind, use = "a classification data set (class labels)", CLASSIFIERS
    return (f"model {model!r} does not fit dataset {dataset!r}: {dataset} is {kind}; use "
            + (f"{use[0]}-{dataset}" if len(use) == 1 else f"one of the models {', '.join(use)} (e.g. {use[-1]}-{dataset})"))


@dataclass(frozen=True)
class Metric:
    """What a task's ``*_error`` metrics hold, and how a person reads them.

    ``error``: the classification error rate, shown in % (differences in percentage points).
    ``mse``: the mean squared error of a regression, shown as a plain number.
    """

    key: str  # "error" | "mse"
    name: str  # what a label calls it: "error" | "MSE"
    loss: str  # what the loss is: "cross-entropy (nats)" | "MSE"
    scale: float  # display factor: 100 (per cent) | 1
    unit: str  # after a value: "%" | ""
    diff_unit: str  # after a difference: "pts" | "" (MSE differences are MSE)
    digits: int  # decimals shown

    @property
    def is_rate(self) -> bool:
        return self.key == "error"

    def value(self, x) -> str:
        """``12.34%`` or ``0.0734``; ``—`` when missing."""
        if x is None or x != x:
            return "—"
        return f"{self.scale * x:.{self.digits}f}{self.unit}"

    def diff(self, x) -> str:
        """``+0.42`` (points) or ``+0.0031`` (MSE); ``—`` when missing."""
        if x is None or x != x:
            return "—"
        return f"{self.scale * x:+.{self.digits}f}"

    def axis(self, what: str = "") -> str:
        """An axis label: ``test error (%)`` / ``test MSE``."""
        head = f"{what} {self.name}".strip()
        return f"{head} (%)" if self.is_rate else head

    def diff_axis(self, what: str = "") -> str:
        """A difference's axis label: ``Δ test error (points)`` / ``Δ test MSE``."""
        head = f"Δ {what} {self.name}".replace("  ", " ").strip()
        return f"{head} (points)" if self.is_rate else head


ERROR = Metric("error", "error", "cross-entropy (nats)", 100.0, "%", "pts", 2)
MSE = Metric("mse", "MSE", "MSE", 1.0, "", "", 4)


def task_metric(name: str) -> Metric:
    """The metric a task's ``*_error`` columns hold, from the task's name alone.

    A built-in regression task (``linreg-curve1d``) stores its mean squared error there; every
    other task — the built-in classifiers and every factory task (your own model is trained
    with cross-entropy) — its classification error rate. A factory task cannot take a built-in
    name, so the name decides.
    """
    model, _, dataset = name.partition("-")
    return MSE if model in REGRESSORS and dataset in REGRESSION else ERROR
