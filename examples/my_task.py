"""Your own model and data in a wdstudy study: copy this file and change the three functions.

A study names a factory by import path (``examples/my_task.py:build`` or
``mypkg.tasks:build``); wdstudy calls it once per run, after seeding the run, with the
task's options as keyword arguments, and it returns the model and the train / validation /
test data (see ``wdstudy.tasks.user`` for the whole protocol). ``examples/my_study.yaml``
runs it.

The data here is synthetic — points in ``dim`` dimensions around ``classes`` centres, with
label noise — drawn from a fixed generator, so that every run of the study sees the same
splits whatever seed it trains with.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import Dataset

from wdstudy.tasks.user import UserTask


@functools.lru_cache(maxsize=4)
def make_data(n: int = 1200, dim: int = 16, classes: int = 4, noise: float = 3.0, seed: int = 0):
    """``(train, val, test)`` as ``(x, y)`` tensor pairs (60 / 20 / 20 %), the same on every call."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + noise * torch.randn(n, dim, generator=g)
    a, b = int(0.6 * n), int(0.8 * n)
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


class PairDataset(Dataset):
    """The same examples as a map-style Dataset: what data too large for memory would look like
    (a ``__getitem__`` that reads one example from disk), batched by a DataLoader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def mlp(dim: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def build(hidden: int = 32, n: int = 1200, dim: int = 16, classes: int = 4, as_dataset: bool = False,
          num_workers: int = 2) -> UserTask:
    """A plain ``nn.Module`` returning logits: wdstudy trains it as it trains its built-in models
    (cross-entropy, the cell's optimizer at the trial's learning rate, the spec's schedule).

    ``as_dataset`` hands the splits over as Datasets (read through DataLoaders with
    ``num_workers`` workers) instead of tensors.
    """
    train, val, test = make_data(n, dim, classes)
    if as_dataset:
        train, val, test = (PairDataset(*s) for s in (train, val, test))
    return UserTask(mlp(dim, hidden, classes), train, val, test, num_workers=num_workers)


class LitClassifier(LightningModule):
    """A whole LightningModule, as the protocol asks: built with the study's learning rate, an
    optimizer with ``weight_decay=0``, logits from ``forward``, ``val_loss`` / ``val_error``
    logged; automatic optimization (so ``accumulate_grad_batches`` works)."""

    def __init__(self, lr: float, schedule: str = "constant", dim: int = 16, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(dim, hidden, classes)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_error", (logits.argmax(1) != y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        if self.hparams.schedule == "constant":
            return opt
        from wdstudy.train import cosine_factor

        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def build_lightning(lr: float, schedule: str, hidden: int = 32, n: int = 1200, dim: int = 16,
                    classes: int = 4) -> UserTask:
    """The LightningModule task: ``lr`` and ``schedule`` are the study's (it passes them because
    this signature names them); the other arguments are the task's options."""
    train, val, test = make_data(n, dim, classes)
    return UserTask(LitClassifier(lr, schedule, dim, hidden, classes), train, val, test)
