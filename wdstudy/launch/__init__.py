"""``launch``: a pool of worker processes over a study, with live progress, restarts and resume.

One worker per visible GPU (pinned through ``CUDA_VISIBLE_DEVICES``; ``--per-device K``
packs K per GPU, since one small model uses a sliver of a modern GPU), or N CPU workers
with the cores' threads divided between them, or workers on the devices of an explicit
``--devices`` list. A GPU slot trains with the GPU accelerator or not at all: a worker
that cannot use its device fails its trial with the reason and exits with
:data:`DEVICE_UNUSABLE`, and its slot is given up at once (no restarts). Each worker is
``python -m wdstudy worker SPEC --single``: the same process that joins a study from
another machine. The launcher itself imports no torch:
it creates the cells and starts the workers first, then watches them.

A worker that dies is replaced and its trial re-queued; only a slot that *crash-loops*
(:data:`CRASH_LOOP` failures in a row without finishing a unit: the worker exits with an error
or crashes, as opposed to being killed from outside) is given up. Ctrl-C stops
every worker and leaves no trial RUNNING; running the same command again resumes
(budgets are totals).

The parts, in the order a launch uses them:

* :mod:`.plan`: the devices and one environment per worker slot;
* :mod:`.pool`: the workers — start, reap, restart, stop — watched by :func:`run_pool`;
* :mod:`.progress`: one row model of the study's progress, shown by a rich or a plain renderer;
* this module: the spec checked and the cells created (:func:`prepare`), the launch itself, and
  its end — the exports, the summary (:func:`summary_text`) and the report (:func:`write_report`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..outage import retry_block, unwritable
from ..redact import scrub
from ..spec import StudySpec, load_spec
from ..storage import StudyLock, open_existing, resolve_url, shown, storage_label
from ..tasks.names import task_metric
from .plan import format_plan, parse_nvidia_smi, plan_slots, visible_gpus, why_cpu
from .pool import CRASH_LOOP, DEVICE_FAULT, DEVICE_UNUSABLE, Pool, Slot, run_pool
from .progress import Progress, format_progress, progress_line, progress_table, remaining_units

__all__ = ["CRASH_LOOP", "DEVICE_FAULT", "DEVICE_UNUSABLE", "Pool", "Progress", "Slot", "checked_spec", "create_cells",
           "format_plan", "format_progress", "launch", "parse_nvidia_smi", "plan_slots", "prepare", "progress_line",
           "progress_table", "remaining_units", "run_pool", "summary_text", "visible_gpus", "why_cpu",
           "write_report"]

# optuna, pandas and the engine are imported inside the functions: ``launch`` starts its workers
# first (they spend seconds importing torch) and imports them while the workers start.


def prepare(spec_path: str, storage: str | None, check_factories: bool = True,
            wait: bool = False) -> tuple[StudySpec, str]:
    """Load the spec, check its factory tasks, open the storage, create the cell studies
    (nothing else is written).

    A spec with factory tasks (your own model, :mod:`wdstudy.tasks.user`) has each factory
    imported and called once here, before anything is written, so a bad import path or a
    factory that raises ends in one line and exit code 2 rather than in a study whose every
    trial fails. Only such specs pay for that (it imports torch into this process); the
    workers ``launch`` starts skip it (``check_factories=False``): it checked for them.
    """
    spec, url = checked_spec(spec_path, storage, check_factories)
    create_cells(spec, url, spec_path, wait=wait)
    return spec, url


def checked_spec(spec_path: str, storage: str | None, check_factories: bool = True) -> tuple[StudySpec, str]:
    """The spec (its factory tasks checked) and its storage URL; nothing is opened or written."""
    spec = load_spec(spec_path)
    url = resolve_url(spec, storage)
    if check_factories:  # launch, or a pool of workers: the data, output and storage before any work
        from ..preflight import check_launch

        check_launch(spec, url, str(spec_path))
    if check_factories and any(t.factory is not None for t in spec.tasks):
        from ..tasks.user import check_factories as check

        check(spec, str(spec_path))
    return spec, url


def create_cells(spec: StudySpec, url: str, spec_path: str, wait: bool = False) -> None:
    """Create the cell studies or check them against the spec; re-queue trials of dead workers;
    make the journal's disk reserve whole if the disk has room (:func:`~wdstudy.journal.keep_reserve`).

    ``wait``: a storage that cannot be reached is waited for (within the outage window)
    rather than an error at once (a worker; ``launch`` tells a wrong URL at once)."""
    from ..cells import Cells, ensure_studies
    from ..journal import keep_reserve
    from ..storage import is_rdb, open_storage

    store = retry_block(lambda: open_storage(url), url) if wait else open_storage(url)
    text = scrub(Path(spec_path).read_text())  # stored with the study and shown in its report: no password

    def block():
        with StudyLock(url, spec.name):
            if not is_rdb(url):  # before the trials of dead workers take the room
                keep_reserve(url)
            grown = ensure_studies(spec, store, text)
            Cells(spec, store).release_dead()
        return grown

    grown = retry_block(block, url)
    if grown:
        print(f"study {spec.name}: {len(grown)} cell(s) grown to the spec (more trials or seeds); "
              "the missing runs follow", flush=True)


def launch(spec_path: str, storage: str | None = None, devices: str = "auto", workers: int | None = None,
           quiet: bool = False, threads: int | None = None, dry_run: bool = False,
           per_device: int | None = None, landscape_axis: str | None = None) -> int:
    """``python -m wdstudy launch``: plan the slots, run the pool to the end, then export, summarize and
    report; returns the exit code (0: every unit finished, 1: some did not, 130: stopped)."""
    if landscape_axis is not None:  # refused now, not after the study has trained
        from ..spec import check_landscape_axis

        check_landscape_axis(landscape_axis)
    slots = plan_slots(devices, workers, threads, per_device)
    if dry_run:  # the plan only: nothing is opened or written
        load_spec(spec_path)
        print(format_plan(slots))
        return 0
    spec, url = checked_spec(spec_path, storage)
    where = storage_label(url)
    if not quiet:
        packed = f" ({per_device} per GPU)" if per_device else ""
        print(f"study {spec.name}: {len(spec.cells())} cells, {len(slots)} workers{packed} × "
              f"{slots[0]['WDSTUDY_THREADS']} threads, storage {where}{why_cpu(devices, workers, slots)}",
              flush=True)
    _heal_journal(url)
    try:
        complete = run_pool(spec_path, spec, url, slots, quiet=quiet, warm=_import_report,
                            setup=lambda: create_cells(spec, url, spec_path))
    except KeyboardInterrupt:
        print("\nwdstudy: stopped; no trial is left running. Run the same command to resume.", file=sys.stderr)
        return 130
    from ..analysis import export
    from ..storage import open_storage

    store = open_storage(url)
    out = spec.output_dir()
    try:
        paths = export(store, spec.name, out)
    except OSError as exc:
        raise unwritable(exc, shown(out)) from None
    print(summary_text(store, spec.name))
    print(f"exported {', '.join(shown(p) for p in paths)}")
    write_report(spec_path, storage, quiet=quiet, landscape_axis=landscape_axis)
    if not complete:
        print(f"wdstudy: some units did not finish (see the logs in {shown(out / 'logs')})", file=sys.stderr)
        return 1
    return 0


def _heal_journal(url: str) -> None:
    """A journal's torn tail is set aside here, before the workers start, so that the line saying so
    is launch's, not a worker's log's (the cells are created while the workers import)."""
    from ..storage import is_rdb

    if not is_rdb(url) and Path(url).is_file():
        from ..journal import heal_on_open

        try:
            heal_on_open(url)
        except OSError:  # a full disk, a forbidden path: the storage's own open says so, with the reason
            pass


def _import_report() -> None:
    import pyarrow.parquet  # noqa: F401  (the export's Parquet files)

    import wdstudy.report  # noqa: F401  (matplotlib, seaborn, scipy: seconds, paid while workers train)

    from ..report.figures import warm_up

    warm_up()  # and matplotlib's first drawing


def summary_text(storage, study: str) -> str:
    """Each cell's best search trial and its evaluation over seeds (mean ± sd), then the compute
    spent, GPU-hours and CPU-hours apart (where each run really trained)."""
    from ..analysis import chosen_trial, compute_hours, evaluations_frame, trials_frame

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
        best = chosen_trial(comp)
        e = evals[(evals.cell == cell) & (evals.state == "COMPLETE")] if not evals.empty else evals
        metric = task_metric(comp.task.iloc[0])  # the error rate, or a regression's MSE
        sd = (lambda c: e[c].std(ddof=1) if len(e) > 1 else 0.0)  # noqa: B023 (used in this iteration only)
        if len(e) and metric.is_rate:
            te = f"{100 * e.test_error.mean():.2f}±{100 * sd('test_error'):.2f}% (n={len(e)})"
            gap = f"{100 * e.gap_error.mean():+.2f}±{100 * sd('gap_error'):.2f} pts"
        elif len(e):
            te = f"{e.test_error.mean():.4f}±{sd('test_error'):.4f} MSE (n={len(e)})"
            gap = f"{e.gap_error.mean():+.4f}±{sd('gap_error'):.4f} MSE"
        else:
            te = gap = "—"
        lines.append(
            f"{label:<34} {best.value:>9.4f} {best.lr:>9.3g} {best.weight_decay:>9.3g} {te:>17} {gap:>17}"
        )
    hours = compute_hours(trials, evals)
    lines.append(f"compute: {hours['gpu_hours']:.3f} GPU-hours, {hours['cpu_hours']:.3f} CPU-hours (summed run times)")
    return "\n".join(lines)


def write_report(spec_path: str, storage: str | None = None, quiet: bool = False,
                 landscape_axis: str | None = None) -> int:
    """Build the study's report from its storage alone into the spec's output folder; the landscape
    figure's axis is ``landscape_axis`` (``--landscape-axis``), else the spec's ``report.landscape_axis``."""
    from ..cells import spec_drift
    from ..report import build_report
    from ..spec import check_landscape_axis

    if landscape_axis is not None:
        check_landscape_axis(landscape_axis)
    spec = load_spec(spec_path)
    url = resolve_url(spec, storage)
    start = time.monotonic()
    store = open_existing(url)
    drift = spec_drift(spec, store)
    if drift:
        print(f"note: {drift}")
    try:
        paths = build_report(store, spec.name, spec.output_dir(), storage_label(url),
                             landscape_axis or spec.report.landscape_axis)
    except OSError as exc:
        from ..outage import classify

        if classify(exc) != "unwritable":
            raise
        raise unwritable(exc, shown(spec.output_dir())) from None
    print(f"report: {shown(paths.html)} and {shown(paths.pdf)} "
          f"({time.monotonic() - start:.1f} s)")
    return 0
