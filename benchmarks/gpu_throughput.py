"""Trials per hour on one GPU with K = 1, 2, 4, 8, 16 workers sharing it (``launch --per-device K``).

One small MNIST-1D model uses a sliver of a modern GPU, so one worker per device leaves it
mostly idle; packing K workers on it (as Ray Tune's fractional GPUs do) should multiply the
throughput until the GPU, the CPU cores feeding it or its memory run out. For each K this runs
``python -m wdstudy launch`` on a study of the MLP, CNN and GRU MNIST-1D tasks (random sampler,
generations of K trials per cell so no worker waits for a generation) pinned to one GPU, in a
temporary folder, and reads the runs' start and end times from the exports:

    trials/hour = finished runs (search trials and evaluation seeds) / (last end − first start)

which leaves out the workers' start-up and the report. It prints each K's rate and its ratio to
K = 1. Needs a CUDA device; on a machine without one it says so and exits 0.

    python benchmarks/gpu_throughput.py [--ks 1,2,4,8,16] [--device 0] [--rounds 4] [--epochs 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TASKS = [{"name": "mlp-mnist1d"}, {"name": "cnn-mnist1d"}, {"name": "gru-mnist1d", "grad_clip": 1.0}]


def spec_for(k: int, rounds: int, epochs: int, precision: str, out: Path) -> dict:
    """A study whose every generation offers each cell K trials, ``rounds`` generations deep."""
    return {
        "name": f"gpu-throughput-k{k}",
        "tasks": TASKS,
        "task_defaults": {"epochs": epochs, "precision": precision},
        "optimizers": ["adam"],
        "regularizers": ["decoupled"],
        "search": {"lr": {"low": 3e-4, "high": 1e-2}, "weight_decay": {"low": 1e-3, "high": 1.0},
                   "sampler": "random", "trials": rounds * k, "batch": k},
        "evaluation": {"seeds": 1},
        "output": str(out),
    }


def one_k(k: int, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    import pandas as pd

    out = folder / "out"
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_for(k, args.rounds, args.epochs, args.precision, out)))
    cmd = [sys.executable, "-m", "wdstudy", "launch", str(spec), "--devices", args.device, "--per-device", str(k),
           "--quiet"] + (["--threads", str(args.threads)] if args.threads else [])
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"K={k}: launch failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    runs = pd.concat([pd.read_csv(out / "trials.csv"), pd.read_csv(out / "evaluations.csv")])
    runs = runs[runs.state.isin(["COMPLETE", "PRUNED"])]
    if not runs.device.astype(str).str.startswith("cuda").all():
        sys.exit(f"K={k}: some runs did not train on a GPU: {sorted(set(runs.device.astype(str)))}")
    span = (pd.to_datetime(runs.end).max() - pd.to_datetime(runs.start).min()).total_seconds()
    return {"runs": len(runs), "span": span, "per_hour": len(runs) / span * 3600, "wall": time.monotonic() - t0,
            "device": runs.device.iloc[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,2,4,8,16", help="workers per GPU to measure (default 1,2,4,8,16)")
    ap.add_argument("--device", default="0", help="the GPU, as launch --devices takes it (default 0)")
    ap.add_argument("--rounds", type=int, default=4, help="generations per cell; each has K trials (default 4)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per trial (default 5)")
    ap.add_argument("--precision", default="32", help="32, bf16-mixed or 16-mixed (default 32)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: launch's)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    import torch

    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device is usable here (torch.cuda.is_available() is False); "
              "nothing was measured. Run it on a machine with a GPU.")
        return 0
    rows = {}
    for k in ks:
        with tempfile.TemporaryDirectory() as d:
            rows[k] = one_k(k, args, Path(d))
        print(f"K={k:>2}: {rows[k]['runs']} runs in {rows[k]['span']:.0f} s → {rows[k]['per_hour']:.0f} trials/hour "
              f"({rows[k]['device']}; launch took {rows[k]['wall']:.0f} s)", flush=True)
    base = rows[ks[0]]["per_hour"]
    print(f"\n{'K':>3} {'trials/hour':>12} {f'ratio to K={ks[0]}':>14}")
    for k in ks:
        print(f"{k:>3} {rows[k]['per_hour']:>12.0f} {rows[k]['per_hour'] / base:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
