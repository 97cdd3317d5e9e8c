"""Time of ``build_report`` for a generated study of 1,000 trials (no training involved).

The study has 3 tasks x 2 optimizers x 3 regularizers = 18 cells; the cells get about
1,000 search trials together (56 each) plus 5 evaluation seeds each, with 30-epoch
histories, in a journal file. Also timed, as the baseline of the same run: reading
the trials into a DataFrame, which every report has to do.

    python benchmarks/report_speed.py [--trials-per-cell 56]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from wdstudy.analysis import trials_frame
from wdstudy.config import validate
from wdstudy.report import build_report
from wdstudy.spec import StudySpec
from wdstudy.storage import open_storage
from wdstudy.synthetic import fill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials-per-cell", type=int, default=56)
    args = ap.parse_args()
    spec = validate(StudySpec, {
        "name": "bench",
        "tasks": ["mlp-mnist1d", "cnn-mnist1d", "gru-mnist1d"],
        "optimizers": ["adam", "sgd"],
        "regularizers": ["none", "l2", "decoupled"],
        "search": {"lr": {"low": 1e-4, "high": 1e-1},
                   "weight_decay": {"l2": {"low": 1e-6, "high": 1e-1}, "decoupled": {"low": 1e-4, "high": 10}},
                   "sampler": "tpe", "trials": args.trials_per_cell},
        "evaluation": {"seeds": 5},
    })
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "optuna.journal")
        t = time.perf_counter()
        fill(spec, open_storage(url), epochs=30)
        made = time.perf_counter() - t
        storage = open_storage(url)
        t = time.perf_counter()
        n = len(trials_frame(storage, "bench"))
        read = time.perf_counter() - t
        t = time.perf_counter()
        paths = build_report(open_storage(url), "bench", Path(tmp) / "out", url)
        built = time.perf_counter() - t
        print(f"{n} search trials in {len(spec.cells())} cells (generated in {made:.1f} s)")
        print(f"reading the trials: {read:.2f} s; full report (HTML + PDF, {len(paths.figures)} figures): "
              f"{built:.1f} s = {built / read:.0f}x the read")


if __name__ == "__main__":
    main()
