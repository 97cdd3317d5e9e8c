"""``launch``: a pool of worker processes over a study, with live progress, restarts and resume.

One worker per visible GPU (pinned through ``CUDA_VISIBLE_DEVICES``), or N CPU workers
with the cores' threads divided between them, or one worker per device of an explicit
``--devices`` list. Each worker is ``python -m wdstudy worker SPEC --single``: the same
process that joins a study from another machine. Killed workers are replaced and their
trials retried; Ctrl-C stops every worker and leaves no trial RUNNING; running the same
command again resumes (budgets are totals).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .analysis import export, progress_frame
from .errors import WdstudyError
from .search import ensure_studies
from .spec import StudySpec, load_spec
from .storage import StudyLock, default_url, is_rdb, open_storage, release_dead_trials

MAX_RESTARTS = 5


def shown(path) -> str:
    """A path as a person would type it here: relative below the current folder, else absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def resolve_url(spec: StudySpec, storage: str | None) -> str:
    return storage or spec.storage or default_url(spec.output_dir())


def plan_slots(devices: str, workers: int | None) -> list[dict[str, str]]:
    """Environment of each worker slot: its ``CUDA_VISIBLE_DEVICES`` and thread count."""
    cores = os.cpu_count() or 1
    if devices == "auto":
        import torch

        n_gpu = torch.cuda.device_count()
        ids = [str(i) for i in range(n_gpu)] if n_gpu and workers is None else None
    elif devices == "cpu":
        ids = None
    else:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        if not ids or len(set(ids)) != len(ids):
            raise WdstudyError(f"--devices={devices!r}: give 'auto', 'cpu' or distinct device ids like 0,1")
    if ids is not None:
        threads = max(1, cores // len(ids))
        return [{"CUDA_VISIBLE_DEVICES": d, "WDSTUDY_THREADS": str(threads)} for d in ids]
    n = workers if workers is not None else cores
    if n < 1:
        raise WdstudyError(f"--workers={n}: must be >= 1")
    threads = max(1, cores // n)
    return [{"CUDA_VISIBLE_DEVICES": "", "WDSTUDY_THREADS": str(threads), "WDSTUDY_ACCELERATOR": "cpu"}
            for _ in range(n)]


@dataclass
class Slot:
    index: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    finished: bool = False
    log: Path | None = None
    dead_pids: list[int] = field(default_factory=list)


def _start(slot: Slot, spec_path: str, url: str, log_dir: Path) -> None:
    env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1", "WDSTUDY_PARENT_PID": str(os.getpid())}
    slot.log = log_dir / f"worker-{slot.index}.log"
    cmd = [sys.executable, "-m", "wdstudy", "worker", spec_path, "--storage", url, "--single"]
    with open(slot.log, "a") as f:
        slot.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def format_progress(df, elapsed: float | None = None, eta: float | None = None) -> str:
    lines = []
    head = f"{'cell':<40} {'trials':>9} {'run':>4} {'fail':>4} {'pruned':>6} {'best':>8} {'eval':>6}"
    lines.append(head)
    for r in df.itertuples():
        best = "—" if r.best is None or r.best != r.best else f"{r.best:.4f}"
        lines.append(
            f"{r.cell:<40} {f'{r.done}/{r.budget}':>9} {r.running:>4} {r.fail:>4} {r.pruned:>6} "
            f"{best:>8} {f'{r.eval_done}/{r.eval_total}':>6}"
        )
    if elapsed is not None:
        tail = f"elapsed {_hms(elapsed)}"
        if eta is not None:
            tail += f" · about {_hms(eta)} left"
        lines.append(tail)
    return "\n".join(lines)


def progress_line(df, elapsed: float, eta: float | None) -> str:
    """One line for logs (no terminal): totals over all cells."""
    line = (f"[{_hms(elapsed)}] trials {int(df.done.sum())}/{int(df.budget.sum())} · "
            f"evaluation {int(df.eval_done.sum())}/{int(df.eval_total.sum())} · running {int(df.running.sum())} · "
            f"failed {int(df.fail.sum())} · pruned {int(df.pruned.sum())}")
    return line + (f" · about {_hms(eta)} left" if eta is not None else "")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _remaining_units(df) -> int:
    return int((df["budget"] - df["done"]).clip(lower=0).sum() + (df["eval_total"] - df["eval_done"]).sum())


def run_pool(
    spec_path: str,
    spec: StudySpec,
    url: str,
    slots: list[dict[str, str]],
    *,
    quiet: bool = False,
    display: bool = True,
) -> bool:
    """Run worker processes until all finish; returns True if every cell is searched and evaluated."""
    storage = open_storage(url)
    names = spec.study_names()
    log_dir = spec.output_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = [Slot(i, env) for i, env in enumerate(slots)]
    for s in pool:
        _start(s, spec_path, url, log_dir)

    # SIGTERM (kill, timeout, a batch system) stops the pool as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    tty = sys.stdout.isatty() and not quiet and display
    start = time.monotonic()
    first = progress_frame(storage, spec.name)
    remaining0 = _remaining_units(first)
    last_print, drawn = 0.0, 0
    interrupted = False
    try:
        while True:
            for s in pool:
                if s.finished or s.proc is None:
                    continue
                rc = s.proc.poll()
                if rc is None:
                    continue
                if rc == 0:
                    s.finished = True
                    continue
                # A worker died (killed, crashed): fail and retry its trial, start a replacement.
                with StudyLock(url, spec.name):
                    release_dead_trials(storage, names, dead_pids={s.proc.pid})
                if s.restarts >= MAX_RESTARTS:
                    s.finished = True
                    print(f"wdstudy: worker {s.index} failed {s.restarts + 1} times; see {s.log}", file=sys.stderr)
                    continue
                s.restarts += 1
                _start(s, spec_path, url, log_dir)
            done = all(s.finished for s in pool)
            now = time.monotonic()
            if not quiet and display and (done or now - last_print >= (1.0 if tty else 15.0)):
                df = progress_frame(storage, spec.name)
                elapsed = now - start
                rem = _remaining_units(df)
                finished_units = remaining0 - rem
                eta = rem * elapsed / finished_units if finished_units > 0 else None
                text = format_progress(df, elapsed, eta) if tty or done else progress_line(df, elapsed, eta)
                if tty and drawn:
                    sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
                print(text, flush=True)
                drawn = text.count("\n") + 1
                last_print = now
            if done:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
    finally:  # also on any error in this process: never leave workers behind
        if interrupted or not all(s.finished for s in pool):
            _stop_all(pool, storage, names, StudyLock(url, spec.name))
    signal.signal(signal.SIGTERM, previous)
    if interrupted:
        raise KeyboardInterrupt
    df = progress_frame(storage, spec.name)
    return _remaining_units(df) == 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_all(pool: list[Slot], storage, names: list[str], lock: StudyLock, timeout: float = 60.0) -> None:
    """SIGTERM every worker (each fails and re-queues its trial), then SIGKILL stragglers."""
    for s in pool:
        if s.proc is not None and s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for s in pool:
        if s.proc is None:
            continue
        try:
            s.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()
    with lock:
        release_dead_trials(storage, names, dead_pids={s.proc.pid for s in pool if s.proc is not None})


def prepare(spec_path: str, storage: str | None) -> tuple[StudySpec, str]:
    """Load the spec, open the storage, create the cell studies (nothing else is written)."""
    spec = load_spec(spec_path)
    url = resolve_url(spec, storage)
    store = open_storage(url)
    ensure_studies(spec, store, Path(spec_path).read_text())
    with StudyLock(url, spec.name):
        release_dead_trials(store, spec.study_names())
    return spec, url


def launch(spec_path: str, storage: str | None = None, devices: str = "auto", workers: int | None = None,
           quiet: bool = False) -> int:
    slots = plan_slots(devices, workers)
    spec, url = prepare(spec_path, storage)
    where = url if is_rdb(url) else shown(url)
    if not quiet:
        print(f"study {spec.name}: {len(spec.cells())} cells, {len(slots)} workers, storage {where}", flush=True)
    try:
        complete = run_pool(spec_path, spec, url, slots, quiet=quiet)
    except KeyboardInterrupt:
        print("\nwdstudy: stopped; no trial is left running. Run the same command to resume.", file=sys.stderr)
        return 130
    store = open_storage(url)
    out = spec.output_dir()
    paths = export(store, spec.name, out)
    print(summary_text(store, spec.name))
    print(f"exported {', '.join(shown(p) for p in paths)}")
    write_report(spec_path, storage, quiet=quiet)
    if not complete:
        print(f"wdstudy: some units did not finish (see the logs in {shown(out / 'logs')})", file=sys.stderr)
        return 1
    return 0


def summary_text(storage, study: str) -> str:
    """Each cell's best search trial and its evaluation over seeds (mean ± sd)."""
    from .analysis import evaluations_frame, trials_frame

    trials = trials_frame(storage, study)
    evals = evaluations_frame(storage, study)
    lines = [f"{'cell':<34} {'best val':>9} {'lr':>9} {'λ':>9} {'test error ± sd':>17} {'gap (test−train)':>17}"]
    if trials.empty:
        return "no trials yet"
    for cell, g in trials.groupby("cell", sort=True):
        comp = g[g.state == "COMPLETE"]
        label = cell[len(study) + 1 :]
        if comp.empty:
            lines.append(f"{label:<34} {'—':>9}")
            continue
        best = comp.loc[comp.value.idxmin()]
        e = evals[(evals.cell == cell) & (evals.state == "COMPLETE")] if not evals.empty else evals
        if len(e):
            te = f"{100 * e.test_error.mean():.2f}±{100 * e.test_error.std(ddof=1) if len(e) > 1 else 0:.2f}% (n={len(e)})"
            gap = f"{100 * e.gap_error.mean():+.2f}±{100 * e.gap_error.std(ddof=1) if len(e) > 1 else 0:.2f} pts"
        else:
            te = gap = "—"
        lines.append(
            f"{label:<34} {best.value:>9.4f} {best.lr:>9.3g} {best.weight_decay:>9.3g} {te:>17} {gap:>17}"
        )
    return "\n".join(lines)


def write_report(spec_path: str, storage: str | None = None, quiet: bool = False) -> int:
    """Build the study's report from its storage alone into the spec's output folder."""
    from .report import build_report

    spec = load_spec(spec_path)
    url = resolve_url(spec, storage)
    if not is_rdb(url) and not Path(url).exists():
        raise WdstudyError(f"storage={url!r}: no such journal file (has the study been launched?)")
    label = url if is_rdb(url) else shown(url)
    start = time.monotonic()
    paths = build_report(open_storage(url), spec.name, spec.output_dir(), label)
    print(f"report: {shown(paths.html)} and {shown(paths.pdf)} "
          f"({time.monotonic() - start:.1f} s)")
    return 0
