"""Tasks: a named dataset + backbone with its sizes and training budget.

A task is named ``MODEL-DATASET`` (``mlp-mnist1d``, ``cnn-mnist1d``, ``gru-mnist1d``,
``lstm-mnist1d``, ``logreg-mnist1d``, ``cnn-cifar10``, ``mlp-fashionmnist``, ...,
``linreg-curve1d``) and configured by a :class:`TaskConfig`, plain data that a study spec can
override field by field. Classifiers pair with the classification datasets and the linear
regression ``linreg`` with the regression dataset ``curve1d`` (:mod:`.names`); other pairs are
refused by name. A task
with a ``factory`` (``mypkg.tasks:build``) is your own model and data instead: see
:mod:`wdstudy.tasks.user`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .names import DATASETS, INPUT_SHAPES, MODELS, NUM_CLASSES, SPLIT_POOL, Metric, fits, misfit, task_metric

#: Loaded on first use, so that specs and reports can use TaskConfig without importing torch.
_LAZY = {"ShuffledBatches": "data", "Split": "data", "TaskData": "data", "load_data": "data", "build_model": "models"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Every built-in task: the model-dataset pairs that fit (classifiers on class labels, linreg on curve1d).
TASKS: tuple[str, ...] = tuple(f"{m}-{d}" for m in MODELS for d in DATASETS if fits(m, d))

#: Lightning precisions a task may train with. Full precision is the default: mixed precision
#: changes the numbers a study compares, so it must be asked for.
PRECISIONS = ("32", "bf16-mixed", "16-mixed")

#: Model-size defaults per backbone (and per input kind where they differ).
_SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 256, "layers": 2},
    "cnn": {"width": 32, "layers": 3, "kernel_size": 5},
    "cnn-image": {"width": 32, "layers": 3, "kernel_size": 3},
    "gru": {"width": 64, "layers": 1},
    "lstm": {"width": 64, "layers": 1},
    "logreg": {},  # multinomial logistic regression: one linear layer, nothing to size
    "linreg": {},  # linear regression on fixed features: one linear layer, nothing to size
}
_SIZE_FIELDS = {"mlp": ("width", "layers", "dropout"), "cnn": ("width", "layers", "kernel_size", "batch_norm", "dropout")}
_SIZE_FIELDS["gru"] = _SIZE_FIELDS["lstm"] = ("width", "layers", "dropout", "chunk")
_SIZE_FIELDS["logreg"] = _SIZE_FIELDS["linreg"] = ()

#: Defaults that differ by dataset, used where the task (or the spec's task_defaults) leaves the
#: field out. curve1d is 100 points: half of them validate, and a wiggly fit takes many small steps.
_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "curve1d": {"epochs": 80, "batch_size": 10, "val_fraction": 0.5},
}

#: The fields a factory task shares with built-in tasks: how the study trains it. Every other
#: key of a factory task is an option, passed to the factory as a keyword argument.
TRAINING_FIELDS = ("epochs", "batch_size", "eval_batch_size", "grad_clip", "precision", "accumulate_grad_batches",
                   "deterministic", "tf32")
#: Fields that exist only for factory tasks; left out of a built-in cell's record while unset.
FACTORY_ONLY = {"factory": None, "options": {}, "accumulate_grad_batches": 1}
#: Fields added after studies were stored: left out of a cell's record while unset, so those studies resume.
LATER_FIELDS = {"chunk": None, "deterministic": True, "tf32": False}
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class TaskConfig(BaseModel):
    """One task: which data, which backbone and sizes, and the training budget.

    Size fields left unset take the backbone's defaults; ``kernel_size`` and
    ``batch_norm`` apply to CNNs only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # before name, so that name's validator knows whether the task is built-in
    factory: str | None = Field(None, description="your own task: module.path:function or file.py:function")
    name: str
    width: int | None = Field(None, ge=1, description="MLP hidden units, CNN first-layer channels, RNN hidden size")
    layers: int | None = Field(None, ge=1, description="hidden layers / conv layers / stacked RNN layers")
    kernel_size: int | None = Field(None, ge=1)
    batch_norm: bool = False
    chunk: int | None = Field(None, ge=1,
                              description="RNNs on 1-D sequences: values read per step (40 values, chunk 4: 10 steps)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this (after L2 is added)")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(2000, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    max_train: int | None = Field(None, ge=1, description="use only this many training examples")
    data_dir: str | None = None
    download: bool = False
    precision: str = Field("32", description="Lightning precision: 32, bf16-mixed or 16-mixed")
    deterministic: bool = Field(True, description="on a GPU: deterministic cuDNN/cuBLAS algorithms (false: faster)")
    tf32: bool = Field(False, description="on a GPU: let precision 32 use TF32 matrix products and convolutions")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    accumulate_grad_batches: int = Field(1, ge=1, description="factory LightningModules: batches per optimizer step")

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, data: Any) -> Any:
        """Fill the fields a dataset sets its own defaults for, where they were left out."""
        if not isinstance(data, dict) or data.get("factory") is not None or not isinstance(data.get("name"), str):
            return data
        own = _DATASET_DEFAULTS.get(data["name"].partition("-")[2], {})
        return {**own, **data} if own else data

    @model_validator(mode="before")
    @classmethod
    def _options(cls, data: Any) -> Any:
        """A factory task's keys other than the training fields are its factory's options."""
        if not isinstance(data, dict) or data.get("factory") is None:
            return data
        own = {"name", "factory", "options", *TRAINING_FIELDS}
        extra = {k: v for k, v in data.items() if k not in own}
        options = data.get("options") or {}
        if extra and isinstance(options, dict):
            return {**{k: v for k, v in data.items() if k in own}, "options": {**options, **extra}}
        return data

    @field_validator("factory")
    @classmethod
    def _factory_path(cls, v: str | None) -> str | None:
        if v is not None and (":" not in v or not v.rpartition(":")[0] or not v.rpartition(":")[2]):
            raise ValueError("write module.path:function or path/to/file.py:function")
        return v

    @field_validator("options", "accumulate_grad_batches")
    @classmethod
    def _factory_only(cls, v: Any, info) -> Any:
        if "factory" in info.data and info.data["factory"] is None and v not in ({}, 1):  # (a bad factory says so)
            raise ValueError("applies to factory tasks only (built-in tasks train with one optimizer step per batch)")
        return v

    @model_validator(mode="after")
    def _chunk(self) -> TaskConfig:
        if self.chunk is None or self.factory is not None:
            return self
        if self.model not in ("gru", "lstm") or len(self.input_shape) != 1:
            raise ValueError(f"chunk: applies to recurrent tasks on 1-D sequences (gru-mnist1d, lstm-mnist1d), not {self.name}")
        length = self.input_shape[0]
        if length % self.chunk:
            raise ValueError(f"chunk: {self.chunk} does not divide the sequence length {length}")
        return self

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        # YAML reads `precision: 32` as a number; Lightning's own spellings are strings
        if isinstance(v, int) and not isinstance(v, bool) and str(v) in PRECISIONS:
            return str(v)
        if v not in PRECISIONS:
            raise ValueError(f"choose one of {', '.join(PRECISIONS)}")
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str, info) -> str:
        if "factory" not in info.data:
            return v  # the factory itself was refused; that error says it
        if info.data["factory"] is not None:
            if v in TASKS:
                raise ValueError(f"{v!r} is a built-in task; give your own task another name")
            if not _USER_NAME.match(v):
                raise ValueError("use letters, digits, '-', '_' and '.' (the name is part of the cell's study name)")
            return v
        model, _, dataset = v.partition("-")
        if v not in TASKS and model in MODELS and dataset in DATASETS:
            raise ValueError(misfit(model, dataset))
        if v not in TASKS:
            from ..config import did_you_mean

            raise ValueError(f"unknown task {v!r}{did_you_mean(v, TASKS)} (built-in: {', '.join(TASKS)}; "
                             "or give a factory for your own: factory: mypkg.tasks:build)")
        return v

    @property
    def is_user(self) -> bool:
        """Whether this task is built by a factory (your own model and data)."""
        return self.factory is not None

    @property
    def model(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def dataset(self) -> str:
        return self.name.split("-", 1)[1]

    @property
    def metric(self) -> Metric:
        """What this task's ``*_error`` metrics hold: the error rate, or the MSE of a regression."""
        return task_metric(self.name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return INPUT_SHAPES[self.dataset]

    @property
    def train_size(self) -> int | None:
        """Training examples per epoch, from the task's fields alone (None for a factory task, whose
        data only its factory knows): the dataset's :data:`~.names.SPLIT_POOL` less the validation
        split (``round(n·val_fraction)``, as :func:`~.data.split_indices` carves it), at most ``max_train``."""
        if self.is_user:
            return None
        n = SPLIT_POOL[self.dataset]
        train = n - int(round(n * self.val_fraction))
        return train if self.max_train is None else min(train, self.max_train)

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per epoch, known before training (None for a factory task): a built-in
        task steps once per batch and keeps the last, smaller batch, so ``ceil(train_size / batch_size)``
        — what :class:`wdstudy.mechanics.Mechanics` measures as ``steps_per_epoch`` in the run."""
        n = self.train_size
        return None if n is None else max(1, math.ceil(n / self.batch_size))

    def model_kwargs(self) -> dict[str, Any]:
        """Backbone keyword arguments: defaults overridden by the fields that are set."""
        key = "cnn-image" if self.model == "cnn" and len(self.input_shape) == 3 else self.model
        kwargs = dict(_SIZE_DEFAULTS[key])
        for f in _SIZE_FIELDS[self.model]:
            v = getattr(self, f)
            if v is not None:
                kwargs[f] = v
        return kwargs

    def build_model(self):
        from .models import build_model

        return build_model(self.model, self.input_shape, NUM_CLASSES, **self.model_kwargs())

    def load_data(self, with_test: bool = False):
        from .data import load_data

        return load_data(
            self.dataset,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            with_test=with_test,
            data_dir=self.data_dir,
            download=self.download,
            max_train=self.max_train,
        )


def task_config(name: str, **overrides: Any) -> TaskConfig:
    """Build a :class:`TaskConfig` by name, with field overrides; bad input raises WdstudyError."""
    from ..config import validate

    return validate(TaskConfig, {"name": name, **overrides})


__all__ = [
    "DATASETS",
    "MODELS",
    "PRECISIONS",
    "TASKS",
    "TRAINING_FIELDS",
    "Metric",
    "task_metric",
    "ShuffledBatches",
    "Split",
    "TaskConfig",
    "TaskData",
    "load_data",
    "task_config",
]
