"""A factory task whose training takes a known wall time, whatever the machine's load.

Each training batch waits ``pause`` seconds before its forward pass (evaluation does not), so
a run of ``epochs`` epochs over one batch trains for about ``epochs * pause`` seconds while
using almost no CPU. The Slurm time-limit test needs that: Slurm ends a job at its time limit
only within a window (its controller checks limits every 30 s), and the limit must fall while
a trial trains on a shared machine whose speed varies by several times.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from wdstudy.tasks.user import UserTask


class Paced(nn.Module):
    """An MLP whose forward pass, in training mode, first waits ``pause`` seconds."""

    def __init__(self, pause: float, dim: int, hidden: int, classes: int):
        super().__init__()
        self.pause = pause
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        if self.training:
            time.sleep(self.pause)
        return self.net(x)


def build(pause: float = 1.0, n: int = 64, dim: int = 8, hidden: int = 16, classes: int = 2) -> UserTask:
    """``n`` examples in each split (the same on every call); one batch per epoch at batch_size >= n."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * n, dim, generator=g)
    y = (x[:, 0] > 0).long() % classes
    splits = [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(3)]
    return UserTask(Paced(pause, dim, hidden, classes), *splits, num_workers=0)
