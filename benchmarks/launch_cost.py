"""A launch's fixed cost: from ``launch`` to its first trial, and from its last trial to exit.

Runs ``python -m wdstudy launch`` on a 24-trial MLP study (MNIST-1D, 2 cells × 12 trials,
2 evaluation seeds each, 2 CPU workers) in a temporary folder, then reads the trials'
start and end times from the storage:

* start-up = first trial's start − the moment ``launch`` was started;
* wind-down = the moment ``launch`` exited − the last run's end (export, summary, report);
* training = last run's end − first trial's start.

Baseline of the same run: the time a fresh Python process takes to import torch and
Lightning, which every worker pays before it can train.

    python benchmarks/launch_cost.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SPEC = {
    "name": "launch-cost",
    "tasks": [{"name": "mlp-mnist1d", "width": 64}],
    "task_defaults": {"epochs": 5},
    "optimizers": ["adam"],
    "regularizers": ["l2", "decoupled"],
    "search": {"lr": {"low": 1e-4, "high": 1e-1},
               "weight_decay": {"l2": {"low": 1e-6, "high": 1e-1}, "decoupled": {"low": 1e-4, "high": 10.0}},
               "sampler": "random", "trials": 12},
    "evaluation": {"seeds": 2},
}


def one_launch(folder: Path) -> dict[str, float]:
    import pandas as pd

    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "output": str(folder / "out")}))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(spec), "--workers", "2", "--quiet"],
                       capture_output=True, text=True)
    t1 = time.time()
    if r.returncode != 0:
        sys.exit(f"launch failed:\n{r.stderr}")
    runs = pd.concat([pd.read_csv(folder / "out" / "trials.csv"), pd.read_csv(folder / "out" / "evaluations.csv")])
    start = pd.to_datetime(runs.start).min().timestamp()
    end = pd.to_datetime(runs.end).max().timestamp()
    return {"startup": start - t0, "winddown": t1 - end, "training": end - start}


def import_cost() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, lightning.pytorch"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    rows, imports = [], []
    for i in range(args.repeat):
        imports.append(import_cost())
        with tempfile.TemporaryDirectory() as d:
            rows.append(one_launch(Path(d)))
        print(f"run {i + 1}: start-up {rows[-1]['startup']:.1f} s, wind-down {rows[-1]['winddown']:.1f} s, "
              f"training {rows[-1]['training']:.1f} s; import torch+lightning {imports[-1]:.1f} s", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    imp = statistics.median(imports)
    fixed = med["startup"] + med["winddown"]
    print(f"median: start-up {med['startup']:.1f} s + wind-down {med['winddown']:.1f} s = fixed cost {fixed:.1f} s "
          f"(target <= 8 s) against {med['training']:.1f} s of training; "
          f"start-up / import of torch+lightning = {med['startup'] / imp:.2f}x")


if __name__ == "__main__":
    main()
