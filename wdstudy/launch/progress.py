"""A study's progress while it runs: one row model, shown by a rich renderer or a plain one.

:class:`Progress` holds one :class:`CellProgress` per cell (read from
:func:`wdstudy.analysis.progress_frame`), the time elapsed and an estimate of the time left.
Two renderers show it, with the same small interface (:class:`ProgressRenderer`):

* :class:`RichProgress`: a live rich table on a terminal, redrawn every second;
* :class:`PlainProgress`: for a log (no terminal), one line of totals every 15 s and the whole
  table, as plain text, at the end (``status`` prints that table too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class CellProgress:
    """One cell's row: search trials, race and evaluation runs done of their totals."""

    cell: str
    budget: int
    done: int  # search trials finished (complete or pruned)
    running: int
    fail: int
    pruned: int
    best: float | None  # the best objective so far
    eval_done: int
    eval_total: int
    race_done: int = 0
    race_total: int = 0

    @property
    def best_text(self) -> str:
        return "—" if self.best is None else f"{self.best:.4f}"

    @property
    def finished(self) -> bool:
        return self.done >= self.budget and self.race_done >= self.race_total and self.eval_done >= self.eval_total

    @property
    def remaining(self) -> int:
        """Units still to run: search trials, race runs and evaluation runs."""
        return max(0, self.budget - self.done) + max(0, self.race_total - self.race_done) \
            + self.eval_total - self.eval_done


@dataclass(frozen=True)
class Progress:
    """Every cell's row, the time elapsed and about how long is left (seconds; None: not known)."""

    rows: tuple[CellProgress, ...]
    elapsed: float | None = None
    eta: float | None = None

    @classmethod
    def from_frame(cls, df, elapsed: float | None = None, eta: float | None = None) -> Progress:
        """The rows of a :func:`~wdstudy.analysis.progress_frame` (its race columns may be absent)."""
        def best(x) -> float | None:
            return None if x is None or x != x else float(x)

        rows = tuple(CellProgress(
            r["cell"], int(r["budget"]), int(r["done"]), int(r["running"]), int(r["fail"]), int(r["pruned"]),
            best(r["best"]), int(r["eval_done"]), int(r["eval_total"]), int(r.get("race_done", 0)),
            int(r.get("race_total", 0))) for r in df.to_dict("records"))
        return cls(rows, elapsed, eta)

    def timed(self, elapsed: float, remaining_at_start: int) -> Progress:
        """This progress at ``elapsed`` seconds, with the time left extrapolated from the units run since the start."""
        finished = remaining_at_start - self.remaining
        return dataclasses.replace(self, elapsed=elapsed,
                                   eta=self.remaining * elapsed / finished if finished > 0 else None)

    @property
    def race(self) -> bool:
        """Whether any cell races its best trials (the race column is shown only then)."""
        return self.total("race_total") > 0

    @property
    def remaining(self) -> int:
        return sum(r.remaining for r in self.rows)

    def total(self, field: str) -> int:
        return sum(getattr(r, field) for r in self.rows)

    def clock(self) -> str | None:
        """``elapsed 0:01:05 · about 0:02:05 left`` (None before anything was timed)."""
        if self.elapsed is None:
            return None
        return f"elapsed {hms(self.elapsed)}" + (f" · about {hms(self.eta)} left" if self.eta is not None else "")


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressRenderer:
    """How a launch shows its progress: :meth:`start` once, :meth:`show` at most every
    :attr:`interval` seconds (and once more, ``final``, at the end), :meth:`stop` once."""

    #: seconds between two updates
    interval = 1.0

    def start(self, progress: Progress) -> None:
        pass

    def show(self, progress: Progress, final: bool = False) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass


class RichProgress(ProgressRenderer):
    """A live rich table on a terminal; its last state stays on screen."""

    interval = 1.0

    def __init__(self) -> None:
        self._live = None

    def start(self, progress: Progress) -> None:
        from rich.live import Live

        self._live = Live(self.table(progress), refresh_per_second=2, auto_refresh=False)
        self._live.start()

    def show(self, progress: Progress, final: bool = False) -> None:
        self._live.update(self.table(progress), refresh=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    @staticmethod
    def table(p: Progress):
        """A rich table, one row per cell (green once finished), the clock in its caption."""
        from rich.table import Table

        t = Table(title="wdstudy launch", title_justify="left", expand=False, show_edge=False, pad_edge=False)
        for name in ("cell", "trials", "running", "failed", "pruned", "best", *(("race",) if p.race else ()),
                     "evaluation"):
            t.add_column(name, justify="left" if name == "cell" else "right", no_wrap=True)
        for r in p.rows:
            t.add_row(r.cell, f"{r.done}/{r.budget}", str(r.running), f"[red]{r.fail}[/]" if r.fail else "0",
                      str(r.pruned), r.best_text, *((f"{r.race_done}/{r.race_total}",) if p.race else ()),
                      f"{r.eval_done}/{r.eval_total}", style="green" if r.finished else None)
        if p.clock() is not None:
            t.caption = p.clock()
            t.caption_justify = "left"
        return t


class PlainProgress(ProgressRenderer):
    """Plain text for a log: one line of totals per update, the whole table at the end."""

    interval = 15.0

    def show(self, progress: Progress, final: bool = False) -> None:
        print(self.table(progress) if final else self.line(progress), flush=True)

    @staticmethod
    def table(p: Progress) -> str:
        """One line per cell, under a header; the clock last."""
        head = f"{'cell':<40} {'trials':>9} {'run':>4} {'fail':>4} {'pruned':>6} {'best':>8}"
        lines = [head + (f" {'race':>7}" if p.race else "") + f" {'eval':>6}"]
        for r in p.rows:
            races = f" {f'{r.race_done}/{r.race_total}':>7}" if p.race else ""
            lines.append(f"{r.cell:<40} {f'{r.done}/{r.budget}':>9} {r.running:>4} {r.fail:>4} {r.pruned:>6} "
                         f"{r.best_text:>8}{races} {f'{r.eval_done}/{r.eval_total}':>6}")
        if p.clock() is not None:
            lines.append(p.clock())
        return "\n".join(lines)

    @staticmethod
    def line(p: Progress) -> str:
        """Totals over all cells on one line, the time elapsed first."""
        t = p.total
        race = f"race {t('race_done')}/{t('race_total')} · " if p.race else ""
        left = f" · about {hms(p.eta)} left" if p.eta is not None else ""
        return (f"[{hms(p.elapsed or 0.0)}] trials {t('done')}/{t('budget')} · {race}evaluation "
                f"{t('eval_done')}/{t('eval_total')} · running {t('running')} · failed {t('fail')} · "
                f"pruned {t('pruned')}{left}")


def format_progress(df, elapsed: float | None = None, eta: float | None = None) -> str:
    """The progress table as plain text (``status``, and a log's last table)."""
    return PlainProgress.table(Progress.from_frame(df, elapsed, eta))


def progress_table(df, elapsed: float | None = None, eta: float | None = None):
    """The progress table as a rich table (a terminal)."""
    return RichProgress.table(Progress.from_frame(df, elapsed, eta))


def progress_line(df, elapsed: float, eta: float | None) -> str:
    """The progress's totals on one line (a log)."""
    return PlainProgress.line(Progress.from_frame(df, elapsed, eta))


def remaining_units(df) -> int:
    """Units still to run over every cell of a :func:`~wdstudy.analysis.progress_frame`."""
    return Progress.from_frame(df).remaining
