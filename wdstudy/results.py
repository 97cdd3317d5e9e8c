"""A study's results in a notebook: the DataFrames the report is built from.

:func:`load_results` reads a study from its storage alone — finished, still running, or
run on another cluster — as :mod:`wdstudy.analysis` and the report do, and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import WdstudyError


@dataclass
class Results:
    """One study's tables.

    * ``trials``: one row per search trial of every cell (``OUTPUT/trials.csv``):
      ``cell, task, optimizer, regularizer, trial, state, value, lr, weight_decay, ...``,
      the metrics of each run and ``chosen`` (the configuration its evaluation retrains);
    * ``evaluations``: one row per evaluation run, the chosen configuration of a cell on one
      seed, measured on the test split (``OUTPUT/evaluations.csv``);
    * ``comparison``: one row per comparison of two arms of a task × optimizer, paired over
      the evaluation seeds both completed (``tables/comparison.csv``: ``family``, ``margin``,
      ``decision``, ``decision_code``, ``seeds_needed``, ``selection_included``, ``caveats``,
      ``verdict``, the mean difference with its interval, the variance parts, the adjusted p-values);
    * ``decisions``: the comparisons' decisions alone, primary first (task, optimizer, arm,
      reference, family, decision, Δ and its interval, margin, seeds);
    * ``summary``: one row per cell — its pick, edges of range and evaluation means
      (``tables/summary.csv``).
    """

    study: str
    storage: str
    trials: pd.DataFrame
    evaluations: pd.DataFrame
    comparison: pd.DataFrame
    summary: pd.DataFrame

    @property
    def decisions(self) -> pd.DataFrame:
        cols = ["task", "optimizer", "arm", "reference", "family", "decision", "decision_code", "test_error_diff",
                "test_error_low", "test_error_high", "margin", "n_pairs", "seeds_max", "seeds_needed",
                "selection_included"]
        c = self.comparison
        if c.empty:
            return pd.DataFrame(columns=cols)
        return c[cols].sort_values("family", kind="stable", key=lambda f: f != "primary").reset_index(drop=True)


def _is_spec(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) and Path(target).is_file()


def load_results(spec_or_storage: str | Path | None = None, study: str | None = None) -> Results:
    """Load a study's trials, evaluations and comparison as pandas DataFrames.

    ``spec_or_storage`` is a study spec (``studies/NAME.yaml``: its storage and name are
    used, as ``python -m wdstudy report`` does) or a storage — a journal file
    (``reports/NAME/optuna.journal``), ``postgresql://…`` or ``sqlite:///…`` — with
    ``study`` naming the study in it (it may be left out when the storage holds one study).
    The frames are those of the report: ``trials`` and ``evaluations`` are what ``launch``
    exports as ``trials.csv`` and ``evaluations.csv``, ``comparison`` and ``summary`` what the
    report's ``tables/*.csv`` hold (fANOVA importances are not computed here).

    After ``python -m wdstudy launch examples/my_study.yaml``, ``load_results("examples/my_study.yaml")``
    or ``load_results("reports/my-study/optuna.journal")`` reads that study. Example, on a small
    study generated without training (:mod:`wdstudy.synthetic`: 6 trials per cell, 3 evaluation seeds)::

        >>> import tempfile
        >>> from pathlib import Path
        >>> import wdstudy
        >>> from wdstudy.config import validate
        >>> from wdstudy.spec import StudySpec
        >>> from wdstudy.storage import open_storage
        >>> from wdstudy.synthetic import fill
        >>> folder = tempfile.TemporaryDirectory()
        >>> journal = str(Path(folder.name) / "optuna.journal")
        >>> spec = validate(StudySpec, {
        ...     "name": "demo", "tasks": ["mlp-mnist1d"], "optimizers": ["adam"], "regularizers": ["l2", "decoupled"],
        ...     "search": {"lr": {"low": 1e-3, "high": 1e-1}, "sampler": "random", "trials": 6,
        ...                "weight_decay": {"l2": {"low": 1e-6, "high": 1e-2}, "decoupled": {"low": 1e-3, "high": 10}}},
        ...     "evaluation": {"seeds": 3}, "output": folder.name})
        >>> fill(spec, open_storage(journal))
        >>> r = wdstudy.load_results(journal)  # the storage holds one study: no need to name it
        >>> r.study
        'demo'
        >>> r.trials.groupby("regularizer").size().to_dict()
        {'decoupled': 6, 'l2': 6}
        >>> r.evaluations.pivot(index="seed", columns="regularizer", values="test_error").shape  # seeds × arms
        (3, 2)
        >>> r.comparison[["arm", "reference"]].values.tolist()
        [['decoupled', 'l2']]
        >>> folder.cleanup()

    Raises :class:`~wdstudy.errors.WdstudyError` (one line naming the argument) when the
    spec, the storage or the study does not exist. Left out, ``spec_or_storage`` is the
    ``WDSTUDY_STORAGE`` environment variable (a URL whose password stays out of the code).
    """
    from .analysis import evaluations_frame, trials_frame
    from .redact import redact
    from .spec import load_spec
    from .storage import NotLaunched, open_existing, resolve_url, storage_label

    if spec_or_storage is None:  # the storage kept off the command line and out of the code
        import os

        spec_or_storage = os.environ.get("WDSTUDY_STORAGE")
        if not spec_or_storage:
            raise WdstudyError("spec_or_storage=None: give a spec or a storage, or set WDSTUDY_STORAGE")
    target = str(spec_or_storage)
    if _is_spec(target):
        spec = load_spec(target)
        url = resolve_url(spec, None)
        if study is not None and study != spec.name:
            raise WdstudyError(f"study={study!r}: the spec {target} names the study {spec.name!r}")
        study = spec.name
    else:
        url = target
    try:
        storage = open_existing(url)
    except NotLaunched:
        what = "journal file (has the study been launched?)" if _is_spec(target) else "spec or journal file"
        raise WdstudyError(f"spec_or_storage={str(spec_or_storage)!r}: no such {what}"
                           + (f" ({url})" if url != target else "")) from None
    if study is None:
        study = _only_study(storage, redact(target))

    from .report.tables import compute_tables, load_report_data

    label = storage_label(url)
    d = load_report_data(storage, study, label)
    compute_tables(d, importance=False)
    return Results(study, label, trials_frame(storage, study), evaluations_frame(storage, study),
                   d.comparison, d.summary)


def _only_study(storage, target: str) -> str:
    """The one study whose cells the storage holds; an error listing them if there are several."""
    from . import records as R

    names = sorted({s.study_name.split("/", 1)[0] for s in storage.get_all_studies() if R.CELL in s.user_attrs})
    if len(names) == 1:
        return names[0]
    if not names:
        raise WdstudyError(f"spec_or_storage={target!r}: no wdstudy study in this storage")
    raise WdstudyError(f"spec_or_storage={target!r}: it holds the studies {', '.join(names)}; name one with study=")
