"""The GPU acceptance run: what to run the first time wdstudy has a GPU (``bash benchmarks/gpu_acceptance.sh``).

Each check prints one line (PASS / FAIL, its time, what it saw), then a summary; the exit code
is non-zero if any check failed. On a machine without a usable CUDA device it says so and exits
0 (``--cpu`` runs the checks that make sense on a CPU, to test this script itself). Budget: at
most 8 minutes on one modern GPU; the times below are estimates until the first run replaces
them (docs/how-to/gpu.md).

 1. environment     torch and its CUDA version, the driver, the GPU, its architecture among
                    ``torch.cuda.get_arch_list()``, its compute mode (exclusive modes limit --per-device)
 2. gpu tests       the GPU-only tests of tests/test_devices.py
 3. matrix          every regularizer x 32 / bf16-mixed / 16-mixed on the MLP; CNN, GRU, LSTM, logistic
                    and linear regression with decoupled decay: device, finite metrics, step counts
 4. references      tests/test_regularizers.py on CUDA: L2/decoupled/... against Adam, AdamW, SGD to
                    1e-6, and the skipped 16-mixed steps under GradScaler("cuda")
 5. syncs           torch.cuda.set_sync_debug_mode("error") around every training step: none for
                    32 and bf16-mixed (16-mixed needs the scaler's own)
 6. memory          allocated memory back to its baseline after three runs
 7. slurm           a run under a multi-task Slurm job's variables trains on the GPU
 8. device fault    a device-side assert ends its worker after one failed (lost) trial
 9. throughput      benchmarks/gpu_throughput.py, K = 1 and 4: K = 4 at least 2x the trials/hour
10. reproducible    the same CNN and GRU trial twice, bit for bit
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REGULARIZERS = ("none", "l2", "l1", "decoupled", "independent", "l1-decoupled")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
results: list[tuple[str, bool, float, str]] = []


def check(name: str):
    """Run the decorated check now: PASS if it returns (its text), FAIL if it raises."""
    def run(fn):
        t0 = time.monotonic()
        try:
            ok, text = True, fn() or ""
        except Exception as exc:  # a failed check is reported, and the others still run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            ok, text = False, f"{type(exc).__name__}: {first}"
        took = time.monotonic() - t0
        results.append((name, ok, took, text))
        print(f"{'PASS' if ok else 'FAIL'} {name:<15} {took:6.1f} s  {text}", flush=True)
        return fn
    return run


def tiny(name: str = "mlp-mnist1d", **over):
    from wdstudy.tasks import task_config

    return task_config(name, **{"max_train": 1000, "epochs": 2, **({} if name.startswith("linreg") else
                                                                     {"width": 32}), **over})


def expected_steps(task) -> int:
    data = task.load_data()
    return task.epochs * math.ceil(len(data.train) / task.batch_size)


def pytest_run(args: list[str], env: dict | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    tail = (r.stdout.strip().splitlines() or ["no output"])[-1]
    if r.returncode != 0 or "skipped" in tail and "passed" not in tail:
        raise RuntimeError(tail)
    return tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the checks that make sense on a CPU (tests this script)")
    ap.add_argument("--skip-throughput", action="store_true", help="leave out check 9 (the longest)")
    args = ap.parse_args()

    try:
        import torch

        from wdstudy.train import DivergedError, driver_version, train_run  # noqa: F401
    except ImportError as exc:
        print(f"gpu_acceptance: {exc.msg} in {sys.executable}: run it in the environment wdstudy is installed in "
              "(pip install -e '.[dev]'), or set PYTHON to its python", file=sys.stderr)
        return 2

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("gpu_acceptance: no usable CUDA device here (torch.cuda.is_available() is False); nothing was "
              "checked. Run it on a machine with a GPU (docs/how-to/gpu.md).")
        return 0
    acc = "gpu" if cuda and not args.cpu else "cpu"
    dev = "cuda" if acc == "gpu" else "cpu"
    start = time.monotonic()

    @check("environment")
    def _():
        if acc == "cpu":
            return f"torch {torch.__version__} (CPU run: no GPU facts)"
        cap = torch.cuda.get_device_capability(0)
        arch = f"sm_{cap[0]}{cap[1]}"
        archs = torch.cuda.get_arch_list()
        mode = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.split("\n")[0].strip() or "unknown"
        text = (f"torch {torch.__version__} CUDA {torch.version.cuda}, driver {driver_version()}, "
                f"{torch.cuda.get_device_name(0)} ({arch}), compute mode {mode}, {torch.cuda.device_count()} device(s)")
        if arch not in archs and f"compute_{cap[0]}{cap[1]}" not in archs:
            raise RuntimeError(f"{arch} is not among this build's architectures {archs}; {text}")
        return text

    if acc == "gpu":
        @check("gpu tests")
        def _():
            return pytest_run(["tests/test_devices.py", "-k", "gpu"])

    @check("matrix")
    def _():
        seen = 0
        runs = [(tiny(precision=p), r) for r in REGULARIZERS for p in PRECISIONS]
        runs += [(tiny(n, precision="32"), "decoupled") for n in
                 ("cnn-mnist1d", "gru-mnist1d", "lstm-mnist1d", "logreg-mnist1d", "linreg-curve1d")]
        for task, reg in runs:
            wd = 0.0 if reg == "none" else (1e-4 if reg in ("l2", "l1") else 0.05)
            m = train_run(task, "adam", reg, 3e-3 if not task.name.startswith("linreg") else 0.1, wd,
                          accelerator=acc).metrics
            where = f"{task.name} {reg} {task.precision}"
            if not str(m["device"]).startswith(dev):
                raise RuntimeError(f"{where}: trained on {m['device']}")
            bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v) and k != "penalty"]
            if bad:
                raise RuntimeError(f"{where}: not finite: {bad}")
            if m["steps"] != expected_steps(task):
                raise RuntimeError(f"{where}: {m['steps']} steps, expected {expected_steps(task)}")
            seen += 1
        return f"{seen} runs on {dev}, finite, exact step counts"

    @check("references")
    def _():
        return pytest_run(["tests/test_regularizers.py"], env={"WDSTUDY_TEST_DEVICE": dev})

    if acc == "gpu":
        @check("syncs")
        def _():
            from lightning.pytorch import Callback

            class NoSync(Callback):
                def on_train_batch_start(self, *a):
                    torch.cuda.set_sync_debug_mode("error")

                def on_train_batch_end(self, *a):
                    torch.cuda.set_sync_debug_mode(0)

            try:
                for p in ("32", "bf16-mixed"):
                    for reg in REGULARIZERS:
                        train_run(tiny(precision=p), "adam", reg, 3e-3, 0.05, accelerator=acc, callbacks=[NoSync()])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            return "no host synchronization inside training steps (32, bf16-mixed, every regularizer)"

    @check("memory")
    def _():
        if acc == "cpu":
            return "CUDA memory only (tests/test_gpu_ready.py checks the release on a CPU)"
        task = tiny("cnn-mnist1d")
        train_run(task, "adam", "decoupled", 3e-3, 0.05, accelerator=acc)
        base = torch.cuda.memory_allocated()
        for seed in range(3):
            train_run(task, "adam", "decoupled", 3e-3, 0.05, seed=seed, accelerator=acc)
        now = torch.cuda.memory_allocated()
        if now > base + (1 << 20):
            raise RuntimeError(f"allocated {now - base} bytes more than after the first run")
        return f"allocated {now} bytes after three more runs (baseline {base})"

    @check("slurm")
    def _():
        env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "acceptance", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            m = train_run(tiny(), "adam", "decoupled", 3e-3, 0.05, accelerator=acc).metrics
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        return f"trained on {m['device']} under SLURM_NTASKS=4"

    if acc == "gpu":
        @check("device fault")
        def _():
            with tempfile.TemporaryDirectory() as d:
                d = Path(d)
                (d / "assert_task.py").write_text(textwrap.dedent('''
                    import torch
                    from wdstudy.tasks.user import UserTask

                    def build():
                        g = torch.Generator().manual_seed(0)
                        x = torch.randn(60, 8, generator=g)
                        y = torch.randint(0, 2, (60,), generator=g)
                        y[:40] = 7  # out of range for 2 classes: cross-entropy's device-side assert
                        return UserTask(torch.nn.Linear(8, 2), (x[:40], y[:40]), (x[40:50], y[40:50] % 2),
                                        (x[50:], y[50:] % 2), num_workers=0)
                '''))
                spec = {"name": "fault", "tasks": [{"name": "fault", "factory": f"{d / 'assert_task.py'}:build",
                                                    "epochs": 1, "batch_size": 20}],
                        "optimizers": ["adam"], "regularizers": ["decoupled"],
                        "search": {"lr": {"low": 1e-3, "high": 1e-2}, "weight_decay": {"low": 1e-2, "high": 1},
                                   "sampler": "random", "trials": 3},
                        "evaluation": {"seeds": 1}, "output": str(d / "out")}
                (d / "spec.yaml").write_text(yaml.safe_dump(spec))
                r = subprocess.run([sys.executable, "-m", "wdstudy", "worker", str(d / "spec.yaml"), "--single"],
                                   capture_output=True, text=True, cwd=ROOT)
                from wdstudy.analysis import trials_frame
                from wdstudy.launch import DEVICE_FAULT
                from wdstudy.storage import open_storage

                df = trials_frame(open_storage(str(d / "out" / "optuna.journal")), "fault")
                failed = df[df.state == "FAIL"]
                if r.returncode != DEVICE_FAULT or len(failed) != 1 or failed.fail_kind.iloc[0] != "lost":
                    raise RuntimeError(f"exit {r.returncode}, {len(failed)} failed trial(s): {r.stderr[-300:]}")
                return f"worker exited {DEVICE_FAULT} after one lost trial ({failed.reason.iloc[0][:60]})"

    if acc == "gpu" and not args.skip_throughput:
        @check("throughput")
        def _():
            r = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--ks", "1,4", "--rounds", "2",
                                "--epochs", "3"], cwd=ROOT, capture_output=True, text=True)
            rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["1"], ["4"])]
            rate = {int(k): float(v) for k, v, _ in rows}
            if r.returncode != 0 or set(rate) != {1, 4}:
                raise RuntimeError(f"gpu_throughput failed: {(r.stderr or r.stdout)[-300:]}")
            text = f"K=1 {rate[1]:.0f}/h, K=4 {rate[4]:.0f}/h ({rate[4] / rate[1]:.2f}x)"
            if rate[4] < 2 * rate[1]:
                raise RuntimeError(text + ": less than 2x")
            return text

    @check("reproducible")
    def _():
        for name in ("cnn-mnist1d", "gru-mnist1d"):
            a, b = (train_run(tiny(name), "adam", "decoupled", 3e-3, 0.05, seed=5, accelerator=acc)
                    for _ in range(2))
            keys = [k for k in a.metrics if k != "wall_time_s"]
            diff = [k for k in keys if a.metrics[k] != b.metrics[k]]
            if diff or a.history != b.history:
                raise RuntimeError(f"{name}: runs differ in {diff or 'history'}")
        return "CNN and GRU: two runs equal bit for bit (metrics and per-epoch history)"

    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed "
          f"in {time.monotonic() - start:.0f} s ({'CPU smoke run' if acc == 'cpu' else 'on ' + dev})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
