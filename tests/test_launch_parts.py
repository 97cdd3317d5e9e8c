"""The parts of launch and the storage helpers on their own: the progress row model and its two
renderers, opening only a launched study, the report's panel grid (no worker, no training)."""

from __future__ import annotations

import pandas as pd
import pytest

from wdstudy.launch.progress import PlainProgress, Progress, RichProgress
from wdstudy.storage import NotLaunched, open_existing


def frame(**race) -> pd.DataFrame:
    rows = [{"cell": "t/adam/l2", "budget": 10, "done": 10, "complete": 9, "pruned": 1, "fail": 0, "running": 0,
             "waiting": 0, "best": 0.25, "eval_done": 3, "eval_total": 3},
            {"cell": "t/adam/decoupled", "budget": 10, "done": 4, "complete": 4, "pruned": 0, "fail": 2,
             "running": 2, "waiting": 0, "best": float("nan"), "eval_done": 0, "eval_total": 3}]
    return pd.DataFrame([{**r, **race} for r in rows])


def test_the_row_model_counts_what_is_left_and_extrapolates_the_time():
    p = Progress.from_frame(frame())
    assert not p.race and [r.finished for r in p.rows] == [True, False]
    assert p.rows[1].best is None and p.rows[1].best_text == "—"
    assert p.remaining == 6 + 3  # search trials and evaluation runs of the unfinished cell
    raced = Progress.from_frame(frame(race_done=1, race_total=4))
    assert raced.race and raced.remaining == 9 + 2 * 3 and not raced.rows[0].finished
    timed = p.timed(60.0, remaining_at_start=12)  # 3 units in 60 s: 9 left take 180 s
    assert timed.eta == pytest.approx(180.0) and timed.clock() == "elapsed 0:01:00 · about 0:03:00 left"
    assert p.timed(5.0, remaining_at_start=p.remaining).eta is None  # nothing finished yet: no estimate


def test_the_plain_and_rich_renderers_show_the_same_rows():
    from rich.console import Console

    p = Progress.from_frame(frame(race_done=1, race_total=4)).timed(65.0, 20)
    line = PlainProgress.line(p)
    assert line.startswith("[0:01:05] trials 14/20 · race 2/8 · evaluation 3/6 · running 2 · failed 2")
    table = PlainProgress.table(p)
    assert "race" in table.splitlines()[0] and "t/adam/decoupled" in table and "0.2500" in table
    console = Console(record=True, width=140, force_terminal=False)
    console.print(RichProgress.table(p))
    shown = console.export_text()
    assert all(s in shown for s in ("t/adam/decoupled", "4/10", "1/4", "0/3", "elapsed 0:01:05"))
    assert "race" not in PlainProgress.line(Progress.from_frame(frame()))


def test_only_a_launched_study_is_opened(tmp_path):
    journal = tmp_path / "out" / "optuna.journal"
    with pytest.raises(NotLaunched, match="no such journal file"):
        open_existing(str(journal))
    assert not journal.exists()  # opening a missing journal would have created an empty one
    journal.parent.mkdir()
    journal.write_text("")
    assert open_existing(str(journal)).get_all_studies() == []


def test_the_panel_grid_switches_off_panels_without_a_row():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wdstudy.report.figures import panels

    frame = pd.DataFrame([{"task": "a", "optimizer": "adam", "regularizer": "l2", "cell": "c1"},
                          {"task": "b", "optimizer": "sgd", "regularizer": "decoupled", "cell": "c2"}])
    fig, axes = plt.subplots(2, 2, squeeze=False)
    got = [(ax, row.cell) for ax, row in panels(axes, [("a", "adam"), ("b", "sgd")], ["l2", "decoupled"], frame)]
    assert [(ax, c) for ax, c in got] == [(axes[0][0], "c1"), (axes[1][1], "c2")]
    assert not axes[0][1].axison and not axes[1][0].axison and axes[0][0].axison
    plt.close(fig)
