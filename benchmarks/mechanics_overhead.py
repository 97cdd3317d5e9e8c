"""Overhead of the mechanics callback (wdstudy.mechanics) on the MLP, CNN and GRU tasks.

Two measurements per task, both paired on the same run configuration (Adam + decoupled decay,
cosine schedule, same seed and data):

* **in-run**: the callback times its own hooks; ``mechanics_overhead`` is that time over the rest of
  the same run (no second run involved, so the machine's load cancels out);
* **paired runs**: the run's wall time with the callback against without it, run alternately
  ``--repeats`` times each; the ratio of the medians (noisy on a shared machine).

    python benchmarks/mechanics_overhead.py [--epochs 10] [--repeats 3] [--threads 1] [--regularizer decoupled]

The issue's budget is 3% of a run's time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wdstudy.tasks import task_config
from wdstudy.train import train_run

TASKS = {"mlp-mnist1d": {}, "cnn-mnist1d": {}, "gru-mnist1d": {"chunk": 2, "grad_clip": 1.0}}
LR = 1e-3
WD = {"decoupled": 0.1, "l2": 1e-4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a study worker uses few)")
    ap.add_argument("--regularizer", default="decoupled", choices=sorted(WD))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reg, wd = args.regularizer, WD[args.regularizer]
    print(f"{'task':14} {'in-run overhead':>16} {'wall with':>10} {'without':>9} {'ratio':>7}")
    for name, extra in TASKS.items():
        task = task_config(name, epochs=args.epochs, **extra)
        data = task.load_data()
        train_run(task, "adam", reg, LR, wd, data=data, accelerator="cpu", mechanics=False)  # warm-up
        inrun, with_, without = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = train_run(task, "adam", reg, LR, wd, data=data, accelerator="cpu")
            with_.append(time.perf_counter() - t0)
            inrun.append(r.metrics["mechanics_overhead"])
            t0 = time.perf_counter()
            train_run(task, "adam", reg, LR, wd, data=data, accelerator="cpu", mechanics=False)
            without.append(time.perf_counter() - t0)
        w, wo = statistics.median(with_), statistics.median(without)
        print(f"{name:14} {100 * statistics.median(inrun):15.2f}% {w:9.2f}s {wo:8.2f}s {w / wo:7.3f}", flush=True)


if __name__ == "__main__":
    main()
