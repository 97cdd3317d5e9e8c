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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import WdstudyError
from .spec import StudySpec, load_spec
from .outage import STORAGE_FAULT, StorageFault, retry_block, unwritable
from .redact import redact, scrub
from .storage import StudyLock, default_url, is_rdb
from .tasks.names import task_metric

if TYPE_CHECKING:
    from .cells import Cells

# optuna, pandas and the engine are imported inside the functions: ``launch`` starts its workers
# first (they spend seconds importing torch) and imports them while the workers start.

#: A slot is given up after this many crashes in a row without finishing a unit (kills from outside do not count).
CRASH_LOOP = 8
#: Exit code of a worker whose device is unusable (a GPU slot without a usable GPU): never restarted.
DEVICE_UNUSABLE = 3


def shown(path) -> str:
    """A path as a person would type it here: relative below the current folder, else absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def resolve_url(spec: StudySpec, storage: str | None) -> str:
    """``--storage``, else ``WDSTUDY_STORAGE`` (a URL kept off the command line), else the spec's
    ``storage``, else ``OUTPUT/optuna.journal``."""
    return storage or os.environ.get("WDSTUDY_STORAGE") or spec.storage or default_url(spec.output_dir())


def storage_label(url: str) -> str:
    """The storage as printed: a URL with its password hidden, or a journal path as typed."""
    return redact(url) if is_rdb(url) else shown(url)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without importing torch: the entries of
    ``CUDA_VISIBLE_DEVICES`` (ids, UUIDs or MIG ids, in order) when it is set, else the
    devices ``nvidia-smi -L`` lists, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import shutil

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(listing: str) -> list[str]:
    """Devices of ``nvidia-smi -L``: each GPU's index, except that a GPU split into MIG
    instances gives its instances' UUIDs instead (CUDA sees the instances, not the GPU)."""
    import re

    devices: list[str] = []
    gpu: str | None = None
    migs: list[str] = []
    for line in listing.splitlines() + ["GPU end"]:
        head = re.match(r"\s*GPU (\S+?):?\s", line + " ")
        if head:
            if gpu is not None:
                devices += migs or [gpu]
            gpu, migs = head.group(1), []
            continue
        mig = re.search(r"\bMIG\b.*\(UUID:\s*(MIG-[^)\s]+)\)", line)
        if mig and gpu is not None:
            migs.append(mig.group(1))
    return devices


def plan_slots(devices: str, workers: int | None, threads: int | None = None,
               per_device: int | None = None) -> list[dict[str, str]]:
    """Environment of each worker slot: its ``CUDA_VISIBLE_DEVICES``, accelerator and thread count.

    GPU slots get the ``gpu`` accelerator, so a slot whose GPU is unusable fails instead of
    training on the CPU. ``per_device`` (default 1) workers share each GPU; it is refused
    when the plan has no GPU, rather than ignored, so a job script that expects packed GPUs
    learns at once that it got none. ``threads`` (torch threads per worker) defaults to
    the cores divided between the workers.
    """
    cores = os.cpu_count() or 1
    if threads is not None and threads < 1:
        raise WdstudyError(f"--threads={threads}: must be >= 1")
    if per_device is not None and per_device < 1:
        raise WdstudyError(f"--per-device={per_device}: must be >= 1 (workers per GPU)")
    if devices == "auto":
        gpus = visible_gpus() if workers is None else []
        ids = gpus or None
    elif devices == "cpu":
        ids = None
    else:
        picked = [d.strip() for d in devices.split(",") if d.strip()]
        if not picked or len(set(picked)) != len(picked):
            raise WdstudyError(f"--devices={devices!r}: give 'auto', 'cpu' or distinct device ids like 0,1")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # indexes into what the machine gave this job (SLURM, a scheduler)
            entries = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
            bad = [d for d in picked if not d.isdigit() or int(d) >= len(entries)]
            if bad:
                raise WdstudyError(f"--devices={devices!r}: {', '.join(bad)} is not an index into this job's "
                                   f"CUDA_VISIBLE_DEVICES={visible!r} ({len(entries)} device(s))")
            picked = [entries[int(d)] for d in picked]
        ids = picked
    if ids is not None:
        k = per_device or 1
        n_threads = threads or max(1, cores // (len(ids) * k))
        # nvidia-smi numbers GPUs in PCI order; CUDA's default is fastest first: pin in nvidia-smi's order
        return [{"CUDA_VISIBLE_DEVICES": d, "WDSTUDY_THREADS": str(n_threads), "WDSTUDY_ACCELERATOR": "gpu",
                 "CUDA_DEVICE_ORDER": "PCI_BUS_ID"} for d in ids for _ in range(k)]
    if per_device is not None:
        why = "--workers asks for CPU workers" if workers is not None and devices == "auto" else \
            "no GPU is visible" if devices == "auto" else "--devices=cpu plans CPU workers"
        raise WdstudyError(f"--per-device={per_device}: applies to GPU workers only, and {why} "
                           "(use --workers N for CPU workers)")
    n = workers if workers is not None else cores
    if n < 1:
        raise WdstudyError(f"--workers={n}: must be >= 1")
    n_threads = threads or max(1, cores // n)
    return [{"CUDA_VISIBLE_DEVICES": "", "WDSTUDY_THREADS": str(n_threads), "WDSTUDY_ACCELERATOR": "cpu"}
            for _ in range(n)]


@dataclass
class Slot:
    index: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    deaths: int = 0  # in a row, without finishing a unit
    restart_at: float = 0.0
    finished: bool = False
    log: Path | None = None
    progress: Path | None = None
    units_at_start: int = 0

    def units(self) -> int:
        try:
            return self.progress.stat().st_size if self.progress else 0
        except FileNotFoundError:
            return 0


def _start(slot: Slot, spec_path: str, url: str, log_dir: Path) -> None:
    slot.log = log_dir / f"worker-{slot.index}.log"
    slot.progress = log_dir / f"worker-{slot.index}.units"
    slot.units_at_start = slot.units()
    env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1", "WDSTUDY_PARENT_PID": str(os.getpid()),
           "WDSTUDY_PROGRESS_FILE": str(slot.progress), "WDSTUDY_STORAGE": url}
    # the URL goes through the environment: a command line is visible to every user of the machine
    cmd = [sys.executable, "-m", "wdstudy", "worker", spec_path, "--single"]
    with open(slot.log, "a") as f:
        slot.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def format_progress(df, elapsed: float | None = None, eta: float | None = None) -> str:
    lines = []
    race = "race_total" in df and df.race_total.sum() > 0
    head = f"{'cell':<40} {'trials':>9} {'run':>4} {'fail':>4} {'pruned':>6} {'best':>8}"
    lines.append(head + (f" {'race':>7}" if race else "") + f" {'eval':>6}")
    for r in df.itertuples():
        best = "—" if r.best is None or r.best != r.best else f"{r.best:.4f}"
        races = f" {f'{r.race_done}/{r.race_total}':>7}" if race else ""
        lines.append(
            f"{r.cell:<40} {f'{r.done}/{r.budget}':>9} {r.running:>4} {r.fail:>4} {r.pruned:>6} "
            f"{best:>8}{races} {f'{r.eval_done}/{r.eval_total}':>6}"
        )
    if elapsed is not None:
        tail = f"elapsed {_hms(elapsed)}"
        if eta is not None:
            tail += f" · about {_hms(eta)} left"
        lines.append(tail)
    return "\n".join(lines)


def progress_table(df, elapsed: float | None = None, eta: float | None = None):
    """The live progress display on a terminal: a rich table, one row per cell, totals in its caption."""
    from rich.table import Table

    race = "race_total" in df and df.race_total.sum() > 0
    t = Table(title="wdstudy launch", title_justify="left", expand=False, show_edge=False, pad_edge=False)
    for name, justify in (("cell", "left"), ("trials", "right"), ("running", "right"), ("failed", "right"),
                          ("pruned", "right"), ("best", "right"), *((("race", "right"),) if race else ()),
                          ("evaluation", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    for r in df.itertuples():
        best = "—" if r.best is None or r.best != r.best else f"{r.best:.4f}"
        done = r.done >= r.budget and (not race or r.race_done >= r.race_total) and r.eval_done >= r.eval_total
        t.add_row(r.cell, f"{r.done}/{r.budget}", str(r.running), f"[red]{r.fail}[/]" if r.fail else "0",
                  str(r.pruned), best, *((f"{r.race_done}/{r.race_total}",) if race else ()),
                  f"{r.eval_done}/{r.eval_total}", style="green" if done else None)
    if elapsed is not None:
        t.caption = f"elapsed {_hms(elapsed)}" + (f" · about {_hms(eta)} left" if eta is not None else "")
        t.caption_justify = "left"
    return t


def progress_line(df, elapsed: float, eta: float | None) -> str:
    """One line for logs (no terminal): totals over all cells."""
    line = (f"[{_hms(elapsed)}] trials {int(df.done.sum())}/{int(df.budget.sum())} · "
            + (f"race {int(df.race_done.sum())}/{int(df.race_total.sum())} · "
               if "race_total" in df and df.race_total.sum() else "")
            + f"evaluation {int(df.eval_done.sum())}/{int(df.eval_total.sum())} · running {int(df.running.sum())} · "
            f"failed {int(df.fail.sum())} · pruned {int(df.pruned.sum())}")
    return line + (f" · about {_hms(eta)} left" if eta is not None else "")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _remaining_units(df) -> int:
    race = (df["race_total"] - df["race_done"]).clip(lower=0).sum() if "race_total" in df else 0
    return int((df["budget"] - df["done"]).clip(lower=0).sum() + race + (df["eval_total"] - df["eval_done"]).sum())


def run_pool(
    spec_path: str,
    spec: StudySpec,
    url: str,
    slots: list[dict[str, str]],
    *,
    quiet: bool = False,
    display: bool = True,
    warm: Callable[[], None] | None = None,
    setup: Callable[[], None] | None = None,
) -> bool:
    """Run worker processes until all finish; returns True if every cell is searched and evaluated.

    ``setup`` (creating the cells) runs once the workers are started, while they import
    torch. ``warm`` runs in a background thread once a worker has finished its first unit
    (the workers are then past their own start-up): the launcher's idle time pays for the
    imports of what it does at the end.
    """
    log_dir = spec.output_dir() / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WdstudyError(f"output={str(spec.output_dir())!r}: cannot create {log_dir} ({exc.strerror or exc})") from None
    pool = [Slot(i, env) for i, env in enumerate(slots)]
    for s in pool:
        _start(s, spec_path, url, log_dir)
    try:  # each worker creates or checks the cells too (under the study lock) before it takes work
        if setup is not None:
            setup()
    except BaseException:
        _terminate(pool)
        raise
    from .analysis import progress_frame
    from .cells import Cells
    from .storage import open_storage

    storage = open_storage(url)
    cells = Cells(spec, storage)
    fault: str | None = None  # why the storage stopped the pool (a full disk, a long outage)

    # SIGTERM (kill, timeout, a batch system) stops the pool as Ctrl-C does; SIGINT too, even when
    # this process was started with it ignored (a background job of a non-interactive shell)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_int = signal.signal(signal.SIGINT, _raise_interrupt)
    tty = sys.stdout.isatty() and not quiet and display
    start = time.monotonic()
    first = progress_frame(storage, spec.name)
    remaining0 = _remaining_units(first)
    last_print = 0.0
    interrupted = complete = False
    warming: threading.Thread | None = None
    live = None
    if tty:  # a live table on a terminal; one plain line per change in a log
        from rich.live import Live

        live = Live(progress_table(first, 0.0, None), refresh_per_second=2, auto_refresh=False)
        live.start()
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
                if rc == STORAGE_FAULT:  # its storage is full or gone: stop the pool, not a crash
                    s.finished = True
                    fault = _last_error(s.log)
                    if fault.startswith("see "):  # its log could not be written either
                        fault = f"worker {s.index} stopped: its storage or its log cannot be written ({fault})"
                    continue
                # A worker died (killed, crashed): fail and re-queue its trial, start a replacement
                _release(url, spec, cells, {s.proc.pid})
                if rc == DEVICE_UNUSABLE:  # it will not get better by restarting
                    s.finished = True
                    print(f"wdstudy: worker {s.index} cannot use its device "
                          f"(CUDA_VISIBLE_DEVICES={s.env.get('CUDA_VISIBLE_DEVICES') or '(none)'}): "
                          f"{_last_error(s.log)}; giving it up", file=sys.stderr)
                    continue
                # Killed from outside (SIGKILL, SIGTERM, SIGINT, SIGHUP: an OOM killer, a person, a
                # preemption) is not a crash loop, however often it happens; exiting on its own with an
                # error, or another signal (a segfault), counts unless the worker finished a unit since.
                killed = rc in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP)
                s.deaths = 0 if killed or s.units() > s.units_at_start else s.deaths + 1
                if s.deaths >= CRASH_LOOP:
                    s.finished = True
                    print(f"wdstudy: worker {s.index} crashed {s.deaths} times in a row without finishing a unit; "
                          f"giving it up (see {s.log})", file=sys.stderr)
                    continue
                s.proc = None
                s.restart_at = time.monotonic() + (min(10.0, 0.25 * 2 ** (s.deaths - 1)) if s.deaths > 1 else 0.0)
            for s in pool:
                if not s.finished and s.proc is None and time.monotonic() >= s.restart_at:
                    _start(s, spec_path, url, log_dir)
            if warm is not None and any(s.units() for s in pool):
                warming = threading.Thread(target=warm, name="warm", daemon=True)
                warming.start()
                warm = None
            if fault is not None:
                break
            df = progress_frame(storage, spec.name)
            # every unit recorded: go on while the workers exit by themselves (a second, with torch)
            complete = _remaining_units(df) == 0
            done = complete or all(s.finished for s in pool)
            now = time.monotonic()
            if not quiet and display and (done or now - last_print >= (1.0 if tty else 15.0)):
                elapsed = now - start
                rem = _remaining_units(df)
                finished_units = remaining0 - rem
                eta = rem * elapsed / finished_units if finished_units > 0 else None
                if live is not None:
                    live.update(progress_table(df, elapsed, eta), refresh=True)
                else:
                    print(format_progress(df, elapsed, eta) if done else progress_line(df, elapsed, eta), flush=True)
                last_print = now
            if done:
                break
            # near the end, look more often: the wind-down starts as soon as the last unit is recorded
            time.sleep(0.2 if _remaining_units(df) <= len(pool) else 0.5)
    except KeyboardInterrupt:
        interrupted = True
    finally:  # also on any error in this process: never leave workers behind
        if live is not None:
            live.stop()
        if interrupted or not (complete or all(s.finished for s in pool)):
            _stop_all(pool, cells, url, spec)
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)
    if interrupted:
        raise KeyboardInterrupt
    if fault is not None:
        raise StorageFault(f"{fault} (the workers were stopped; no trial is lost)")
    if warming is not None:
        # the report forks its drawing processes: no thread may hold a lock (an import's, a font
        # cache's) at that moment, or a child inherits it locked and waits forever
        warming.join()
    df = progress_frame(storage, spec.name)
    return _remaining_units(df) == 0


def _last_error(log: Path | None) -> str:
    """The reason a worker gave for exiting: the last ``wdstudy:`` line of its log."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("wdstudy: ")]
    except (OSError, AttributeError):
        lines = []
    return lines[-1][len("wdstudy: "):] if lines else f"see {log}"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _release(url: str, spec: StudySpec, cells: Cells, dead_pids: set[int]) -> None:
    """Fail and re-queue the trials of dead workers, under the study lock, through an outage."""
    def block():
        with StudyLock(url, spec.name):
            cells.release_dead(dead_pids=dead_pids)

    retry_block(block, url)


def _stop_all(pool: list[Slot], cells: Cells, url: str, spec: StudySpec, timeout: float = 60.0) -> None:
    """SIGTERM every worker (each fails and re-queues its trial), then SIGKILL stragglers.

    If the storage cannot take the re-queuing now (full, unreachable), the trials stay
    RUNNING under dead owners: the next launch re-queues them before it starts."""
    _terminate(pool, timeout)
    try:
        with StudyLock(url, spec.name):
            cells.release_dead(dead_pids={s.proc.pid for s in pool if s.proc is not None})
    except StorageFault:
        pass
    except Exception as exc:
        from .outage import classify

        if classify(exc) is None:
            raise


def _terminate(pool: list[Slot], timeout: float = 60.0) -> None:
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
        from .preflight import check_launch

        check_launch(spec, url, str(spec_path))
    if check_factories and any(t.factory is not None for t in spec.tasks):
        from .tasks.user import check_factories as check

        check(spec, str(spec_path))
    return spec, url


def create_cells(spec: StudySpec, url: str, spec_path: str, wait: bool = False) -> None:
    """Create the cell studies or check them against the spec; re-queue trials of dead workers.

    ``wait``: a storage that cannot be reached is waited for (within the outage window)
    rather than an error at once (a worker; ``launch`` tells a wrong URL at once)."""
    from .cells import Cells, ensure_studies
    from .storage import open_storage

    store = retry_block(lambda: open_storage(url), url) if wait else open_storage(url)
    text = scrub(Path(spec_path).read_text())  # stored with the study and shown in its report: no password

    def block():
        with StudyLock(url, spec.name):
            grown = ensure_studies(spec, store, text)
            Cells(spec, store).release_dead()
        return grown

    grown = retry_block(block, url)
    if grown:
        print(f"study {spec.name}: {len(grown)} cell(s) grown to the spec (more trials or seeds); "
              "the missing runs follow", flush=True)


def format_plan(slots: list[dict[str, str]]) -> str:
    """One line per planned worker slot: its device pinning, threads and accelerator."""
    return "\n".join(
        f"slot {i}: CUDA_VISIBLE_DEVICES={s['CUDA_VISIBLE_DEVICES'] or '(none)'} threads={s['WDSTUDY_THREADS']} "
        f"accelerator={s.get('WDSTUDY_ACCELERATOR', 'auto')}" for i, s in enumerate(slots))


def launch(spec_path: str, storage: str | None = None, devices: str = "auto", workers: int | None = None,
           quiet: bool = False, threads: int | None = None, dry_run: bool = False,
           per_device: int | None = None) -> int:
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
              f"{slots[0]['WDSTUDY_THREADS']} threads, storage {where}{_why_cpu(devices, workers, slots)}",
              flush=True)
    try:
        complete = run_pool(spec_path, spec, url, slots, quiet=quiet, warm=_import_report,
                            setup=lambda: create_cells(spec, url, spec_path))
    except KeyboardInterrupt:
        print("\nwdstudy: stopped; no trial is left running. Run the same command to resume.", file=sys.stderr)
        return 130
    from .analysis import export
    from .storage import open_storage

    store = open_storage(url)
    out = spec.output_dir()
    try:
        paths = export(store, spec.name, out)
    except OSError as exc:
        raise unwritable(exc, shown(out)) from None
    print(summary_text(store, spec.name))
    print(f"exported {', '.join(shown(p) for p in paths)}")
    write_report(spec_path, storage, quiet=quiet)
    if not complete:
        print(f"wdstudy: some units did not finish (see the logs in {shown(out / 'logs')})", file=sys.stderr)
        return 1
    return 0


def _why_cpu(devices: str, workers: int | None, slots: list[dict[str, str]]) -> str:
    """Why ``--devices auto`` planned CPU workers, when it did without being told to."""
    import shutil

    if devices != "auto" or workers is not None or slots[0].get("WDSTUDY_ACCELERATOR") != "cpu":
        return ""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return " (CPU workers: CUDA_VISIBLE_DEVICES names no GPU)"
    if shutil.which("nvidia-smi") is None:
        return " (CPU workers: no nvidia-smi on the PATH, so no GPU was looked for)"
    return " (CPU workers: nvidia-smi lists no GPU)"


def _import_report() -> None:
    import pyarrow.parquet  # noqa: F401  (the export's Parquet files)
    import wdstudy.report  # noqa: F401  (matplotlib, seaborn, scipy: seconds, paid while workers train)
    from .report.figures import warm_up

    warm_up()  # and matplotlib's first drawing


def summary_text(storage, study: str) -> str:
    """Each cell's best search trial and its evaluation over seeds (mean ± sd), then the compute
    spent, GPU-hours and CPU-hours apart (where each run really trained)."""
    from .analysis import chosen_trial, compute_hours, evaluations_frame, trials_frame

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
        sd = (lambda c: e[c].std(ddof=1) if len(e) > 1 else 0.0)  # noqa: E731
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


def write_report(spec_path: str, storage: str | None = None, quiet: bool = False) -> int:
    """Build the study's report from its storage alone into the spec's output folder."""
    from .cells import spec_drift
    from .report import build_report
    from .storage import open_storage

    spec = load_spec(spec_path)
    url = resolve_url(spec, storage)
    if not is_rdb(url) and not Path(url).exists():
        raise WdstudyError(f"storage={url!r}: no such journal file (has the study been launched?)")
    start = time.monotonic()
    store = open_storage(url)
    drift = spec_drift(spec, store)
    if drift:
        print(f"note: {drift}")
    try:
        paths = build_report(store, spec.name, spec.output_dir(), storage_label(url))
    except OSError as exc:
        from .outage import classify

        if classify(exc) != "unwritable":
            raise
        raise unwritable(exc, shown(spec.output_dir())) from None
    print(f"report: {shown(paths.html)} and {shown(paths.pdf)} "
          f"({time.monotonic() - start:.1f} s)")
    return 0
