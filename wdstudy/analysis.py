"""pandas DataFrames built from the storage alone (no spec needed): trials, evaluations, progress.

Every cell study carries its own description (user attribute ``cell``), so a study
run on another cluster can be analysed from its storage URL and its name.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from . import records as R
from .outputs import replacing
from .storage import study_trials
from .tasks.names import task_metric

optuna.logging.set_verbosity(optuna.logging.WARNING)

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def cell_studies(storage, study: str) -> dict[str, tuple[optuna.study.StudySummary | None, object]]:
    """``{cell_name: (search_summary, eval_summary_or_None)}`` for every cell of ``study``."""
    summaries = {s.study_name: s for s in storage.get_all_studies()}
    out = {}
    for name, s in summaries.items():
        if name.startswith(f"{study}/") and not name.endswith("/eval") and R.CELL in s.user_attrs:
            out[name] = (s, summaries.get(f"{name}/eval"))
    return dict(sorted(out.items()))


def _rows(storage, summary, cell: R.CellRecord, kind: str) -> list[dict]:
    rows = []
    pick = R.StudyRecord.of(summary).pick if kind == "eval" else None
    for t in study_trials(storage, summary):
        r = R.RunRecord.of(t)
        row = {
            "cell": summary.study_name[: -len("/eval")] if kind == "eval" else summary.study_name,
            "task": cell.task_name,
            "optimizer": cell.optimizer_name,
            "regularizer": cell.regularizer,
            "metric": task_metric(cell.task_name).key,  # what the *_error columns hold: error or mse
            "trial": t.number,
            "state": t.state.name,
            "value": t.value,
            "lr": t.params.get("lr"),
            "weight_decay": cell.decay_of(t.params) if t.params else None,
            "generation": r.generation,
            "slot": r.slot,
            "outcome": r.outcome,
            "reason": None if t.state == TrialState.COMPLETE else (r.reason or r.fail_reason),
            "fail_kind": r.fail_kind,
            "worker": r.worker,
            "cuda_visible_devices": r.cuda_visible_devices,
            "start": t.datetime_start,
            "end": t.datetime_complete,
        }
        for k in R.METRIC_KEYS:
            row[k] = r.metric(k)
        if kind == "eval":
            if row["seed"] is None:
                row["seed"] = r.seed
            row["candidate"] = r.candidate_or(pick)
            row["pick"] = r.candidate_or(pick) == pick
            row["test_outcomes"] = r.test_outcomes
        rows.append(row)
    return rows


def trials_frame(storage, study: str) -> pd.DataFrame:
    """One row per search trial of every cell."""
    rows = []
    for _name, (s, ev) in cell_studies(storage, study).items():
        chosen = R.StudyRecord.of(ev).best_trial if ev is not None else None
        cell_rows = _rows(storage, s, R.StudyRecord.of(s).cell, "search")
        for row in cell_rows:
            row["chosen"] = row["trial"] == chosen  # the configuration its evaluation retrains
        rows += cell_rows
    return pd.DataFrame(rows)


def chosen_trial(complete: pd.DataFrame) -> pd.Series | None:
    """Among one cell's COMPLETE rows of :func:`trials_frame`: the trial its evaluation retrains
    (``chosen``), or, before the evaluation exists, the lowest objective; None if there are none."""
    if complete.empty:
        return None
    picked = complete[complete.chosen] if "chosen" in complete else complete.iloc[:0]
    return picked.iloc[0] if len(picked) else complete.loc[complete.value.idxmin()]


def compute_hours(*frames: pd.DataFrame) -> dict[str, float]:
    """GPU-hours and CPU-hours spent by the runs of :func:`trials_frame` / :func:`evaluations_frame` rows.

    Each run counts where it really trained (its ``device``: ``cuda…`` or ``cpu``), for its
    measured ``wall_time_s``, or, for a run that ended early (pruned, diverged, failed after it
    started training), its start-to-end time. Runs that never started training have no
    device and cost nothing here. These are the runs' hours: with ``--per-device K``, K runs
    share a GPU at once, so their GPU-hours add up to K times the device's occupancy.
    """
    hours = {"gpu_hours": 0.0, "cpu_hours": 0.0}
    for df in frames:
        if df.empty or "device" not in df:
            continue
        seconds = pd.to_numeric(df["wall_time_s"], errors="coerce") if "wall_time_s" in df \
            else pd.Series(float("nan"), index=df.index)
        if "start" in df and "end" in df:
            span = (pd.to_datetime(df["end"]) - pd.to_datetime(df["start"])).dt.total_seconds()
            seconds = seconds.fillna(span)
        device = df["device"].astype("string")
        hours["gpu_hours"] += float(seconds[device.str.startswith("cuda").fillna(False)].sum()) / 3600
        hours["cpu_hours"] += float(seconds[device.str.startswith("cpu").fillna(False)].sum()) / 3600
    return hours


def evaluations_frame(storage, study: str, survivors: bool = False) -> pd.DataFrame:
    """One row per evaluation run of every cell: its chosen configuration × seed, and with
    ``survivors`` the other race survivors' runs too (column ``pick`` tells them apart;
    ``candidate`` is the index among the race's candidates; ``test_outcomes`` the encoded
    per-example test errors, :func:`wdstudy.records.decode_outcomes`)."""
    rows = []
    for _name, (s, ev) in cell_studies(storage, study).items():
        if ev is not None:
            rows += _rows(storage, ev, R.StudyRecord.of(s).cell, "eval")
    out = pd.DataFrame(rows)
    if not survivors and len(out):
        out = out[out["pick"]].reset_index(drop=True)
    return out


def race_studies(storage, study: str) -> dict[str, object]:
    """``{cell_name: race_summary}`` for the cells of ``study`` that have a race study."""
    return {s.study_name[: -len("/race")]: s for s in storage.get_all_studies()
            if s.study_name.startswith(f"{study}/") and s.study_name.endswith("/race")}


def race_frame(storage, study: str) -> pd.DataFrame:
    """One row per race candidate of every racing cell: its search rank and value, its race runs'
    mean and number, and whether the race chose it (columns of ``tables/selection.csv``)."""
    from .proposals import race_standings

    rows = []
    cells = {name: R.cell_of(s.user_attrs) for name, (s, _) in cell_studies(storage, study).items()}
    for name, s in race_studies(storage, study).items():
        cands = R.StudyRecord.of(s).candidates
        cell = cells.get(name)
        if not cands or cell is None:
            continue
        trials = study_trials(storage, s)
        for c in race_standings(cands, trials):
            rows.append({"cell": name, "search_rank": c["rank"], "trial": c["trial"], "lr": c["params"].get("lr"),
                         "weight_decay": cell.decay_of(c["params"]), "search_value": c["value"],
                         "race_mean": c["race_mean"], "race_n": c["race_n"], "diverged": c["diverged"],
                         "race_values": c["race_values"], "chosen": c["chosen"]})
    return pd.DataFrame(rows)


def progress_frame(storage, study: str) -> pd.DataFrame:
    """Per cell: budget, trials by state, best objective so far, race and evaluation runs done.

    A unit's second copy, queued twice and ended unrun (``fail_kind`` ``duplicate``), is no run:
    it is not counted."""
    rows = []
    races = race_studies(storage, study)
    for name, (s, ev) in cell_studies(storage, study).items():
        cell = R.StudyRecord.of(s).cell
        trials = study_trials(storage, s)
        counts = {st: 0 for st in STATES}
        best = math.inf
        for t in trials:
            if R.duplicate(t):
                continue  # a unit queued twice: its copy never ran, no run failed
            counts[t.state.name] += 1
            if t.state == TrialState.COMPLETE and t.value is not None:
                best = min(best, t.value)
        ev_done = 0
        ev_total = cell.looks[0]  # runs of the first round; survivors and later rounds add to it once known
        if ev is not None:
            ev_trials = study_trials(storage, ev)
            ev_done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ev_trials)
            evr = R.StudyRecord.of(ev)
            if evr.best_params is not None:
                ev_total = len(evr.survivors or [0]) * evr.seeds_open_or(len(cell.eval_seeds))
        searched = counts["COMPLETE"] + counts["PRUNED"] >= cell.budget and not counts["RUNNING"]
        selection = cell.selection
        # the race runs the search's best top_k completed trials: as many as there are, once it is searched
        pool = counts["COMPLETE"] if searched else cell.budget
        race_total = min(selection.top_k, pool) * len(selection.seeds) if selection else 0
        race_done = 0
        if name in races:
            race_done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                            for t in study_trials(storage, races[name]))
        if searched and counts["COMPLETE"] == 0:
            ev_total = race_total = 0  # nothing to race or evaluate: every search trial was pruned
        rows.append({
            "cell": name[len(study) + 1 :],
            "budget": cell.budget,
            "done": counts["COMPLETE"] + counts["PRUNED"],
            **{st.lower(): counts[st] for st in STATES},
            "best": None if best == math.inf else best,
            "race_done": race_done,
            "race_total": race_total,
            "eval_done": ev_done,
            "eval_total": ev_total,
        })
    return pd.DataFrame(rows)


def diagnostics_frame(storage, study: str) -> pd.DataFrame:
    """The runs' mechanics (:mod:`wdstudy.mechanics`), one row per run × regularized tensor × checkpoint:
    ``cell, task, optimizer, regularizer, phase`` (search, race or eval), ``trial, pick`` (an evaluation
    run of the cell's pick), ``seed, lr,
    weight_decay``, the run's scalars (``tau_epoch``, ``run_epochs``, ...), then the checkpoint's
    ``step, epoch, layer, weight_norm, angular_update, predicted_angular_update, neuron_spread,
    effective_lr, ...`` (``tables/diagnostics.csv``; empty for runs made before it was recorded)."""
    rows = []
    summaries = {s.study_name: s for s in storage.get_all_studies()}
    for name, (s, _) in cell_studies(storage, study).items():
        cell = R.StudyRecord.of(s).cell
        for phase, key in (("search", name), ("race", f"{name}/race"), ("eval", f"{name}/eval")):
            if key not in summaries:
                continue
            pick = R.StudyRecord.of(summaries[key]).pick if phase == "eval" else None
            for t in study_trials(storage, summaries[key]):
                r = R.RunRecord.of(t)
                table = r.mechanics
                if not table or not t.params:
                    continue
                head = {"cell": name, "task": cell.task_name, "optimizer": cell.optimizer_name,
                        "regularizer": cell.regularizer, "phase": phase, "trial": t.number,
                        # an evaluation run of the race's pick (survivors are evaluated too)
                        "pick": phase == "eval" and r.candidate_or(pick) == pick,
                        "state": t.state.name, "seed": r.seed,
                        "lr": t.params.get("lr"), "weight_decay": cell.decay_of(t.params),
                        **{k: r.metric(k) for k in R.MECHANICS_KEYS}}
                columns = list(table)
                for values in zip(*(table[c] for c in columns)):
                    rows.append({**head, **dict(zip(columns, values))})
    return pd.DataFrame(rows)


def export(storage, study: str, out_dir: Path) -> list[Path]:
    """Write trials and evaluations as CSV and Parquet into ``out_dir``, and the runs' mechanics as
    ``diagnostics.csv`` (:func:`diagnostics_frame`); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, df in (("trials", trials_frame(storage, study)),
                     ("evaluations", evaluations_frame(storage, study, survivors=True))):
        for col in ("start", "end"):
            if col in df:
                df[col] = pd.to_datetime(df[col])
        if "cuda_visible_devices" in df:
            df["cuda_visible_devices"] = df["cuda_visible_devices"].astype("string")
        with replacing(out_dir / f"{stem}.csv") as tmp:
            df.to_csv(tmp, index=False)
        with replacing(out_dir / f"{stem}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        written += [out_dir / f"{stem}.csv", out_dir / f"{stem}.parquet"]
    with replacing(out_dir / "diagnostics.csv") as tmp:
        diagnostics_frame(storage, study).to_csv(tmp, index=False)
    return written + [out_dir / "diagnostics.csv"]
