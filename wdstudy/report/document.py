"""What the report says, in order: sections of paragraphs, tables and figures.

:func:`build_document` is the one place that lists the report's content; :mod:`.html` and
:mod:`.pdf` only lay it out. A new table or figure is added here (and drawn in
:mod:`.figures`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..analysis import compute_hours
from .figures import Rendered
from .meaning import meaning_blocks
from .style import arm_rank, arms_in, err, err_ci, err_head, err_pm, label, missing, num, pct, pm
from .tables import ReportData, range_text

#: (id, title) of every section, in order; each appears even when it has nothing to show yet
SECTIONS = [
    ("answer", "1. Answer"),
    ("design", "2. Study design"),
    ("cells", "3. Chosen configurations"),
    ("seeds", "4. Test error and gap per seed"),
    ("slices", "5. Error against λ and the per-step shrink"),
    ("landscapes", "6. Landscapes over (η, λ)"),
    ("coupling", "7. Coupling of λ and η"),
    ("search", "8. The search"),
    ("curves", "9. Learning curves"),
    ("importance", "10. Hyperparameter importance"),
    ("meaning", "11. What the optimum means"),
    ("appendix", "12. Appendix"),
]
FIGURE_SECTION = {"answer": "answer", "gap": "seeds", "slices": "slices", "landscapes": "landscapes",
                  "coupling": "coupling", "search": "search", "curves": "curves", "importance": "importance",
                  "meaning": "meaning"}


@dataclass
class Para:
    text: str
    kind: str = "p"  # p | status | note


@dataclass
class Table:
    key: str
    head: list[str]
    rows: list[list[str]]
    widths: list[float]  # relative column widths (the PDF's; the HTML wraps the widest)
    caption: str = ""
    warn_cols: tuple[str, ...] = ()  # non-empty cells of these columns are caveats, shown in red


@dataclass
class Listing:
    title: str
    text: str


@dataclass
class Section:
    key: str
    title: str
    blocks: list = field(default_factory=list)


def build_document(d: ReportData, figures: list[Rendered]) -> list[Section]:
    titles = dict(SECTIONS)
    sections = {k: Section(k, t) for k, t in SECTIONS}
    add = lambda key, *blocks: sections[key].blocks.extend(blocks)  # noqa: E731

    add("answer", *(Para(x, "status") for x in d.status_lines))
    if len(d.comparison):
        add("answer", Para(answer_intro(d)), answer_table(d))
    else:
        add("answer", Para("No comparison yet: no two arms of one task have evaluation runs on common seeds."))
    add("design", *(Para(x) for x in design_lines(d)))
    if len(d.summary):
        add("cells", chosen_table(d))
        if len(d.selection):
            add("cells", race_table(d))
        add("cells", evaluation_table(d))
    for f in figures:
        add(FIGURE_SECTION[f.section], f)
    if len(d.coupling):
        add("coupling", coupling_table(d))
    if len(d.pruning):
        add("search", Table("pruning", ["cell", "pruned", "complete", "mean λ position: pruned", "complete",
                                        "p (Mann–Whitney)", "warning"],
                            [[r.cell, str(r.pruned), str(r.complete), num(r.pruned_position, ".2f"),
                              num(r.complete_position, ".2f"), num(r.p_mannwhitney, ".2g"), r.warning]
                             for r in d.pruning.itertuples()], [3, 1, 1, 1.4, 1.2, 1.2, 4],
                            "Where the pruner stopped trials within each λ range (0 = low edge, 1 = high edge).",
                            ("warning",)))
    if len(d.counts):
        add("search", Table("counts", ["cell", "budget", "complete", "pruned", "failed", "running", "waiting",
                                       "evaluation runs"],
                            [[r.cell, str(r.budget), str(r.complete), str(r.pruned), str(r.fail), str(r.running),
                              str(r.waiting), f"{r.eval_done} of {r.eval_total}"] for r in d.counts.itertuples()],
                            [4, 1, 1, 1, 1, 1, 1, 1.4],
                            "Search trials by state (pruned includes runs that diverged) and evaluation runs done."))
    sections["meaning"].blocks[:0] = meaning_blocks(d)  # its text and table before its figures
    add("appendix", Para(f"Storage: {d.storage_label}"),
        Table("versions", ["package", "version"], [[k, str(v)] for k, v in d.versions.items()], [2, 3]),
        Listing("Study spec as run", d.spec_yaml or "(not stored)"))
    for key, section in sections.items():
        if not section.blocks:
            section.blocks.append(Para(EMPTY.get(key, "Nothing to show yet."), "note"))
    assert list(titles) == list(sections)
    return list(sections.values())


EMPTY = {"seeds": "No evaluation runs yet.", "curves": "No evaluation runs yet.",
         "landscapes": "No completed trials yet.", "slices": "No completed trials yet.",
         "coupling": "Too few completed trials.", "importance": "Too few completed trials (fewer than 4 per cell).",
         "cells": "No cell yet.", "meaning": "No evaluation run with recorded mechanics yet."}


@dataclass(frozen=True)
class DocumentHeader:
    """The head of a report document, before its sections (the study report's and the claims report's)."""

    #: what the document is about (a study's name): in the page title, the PDF's footer and its metadata
    name: str
    #: the first heading
    title: str
    #: the line under the heading: where the numbers come from and when the document was made
    generated: str
    #: a name closing the heading, set as code (the study's name)
    code: str = ""

    @property
    def heading(self) -> str:
        """The heading as plain text."""
        return f"{self.title} {self.code}" if self.code else self.title


def study_header(d: ReportData) -> DocumentHeader:
    """The head of a study's report."""
    return DocumentHeader(d.study, "Decoupled weight decay vs L2 regularization — study",
                          f"Study {d.study}, read from the storage {d.storage_label} on "
                          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by wdstudy.", code=d.study)


def answer_intro(d: ReportData) -> str:
    note = d.regression_note()
    st = d.decision
    looks = st.get("looks") or []
    rounds = (f" Evaluation ran in rounds of seeds ({', '.join(map(str, looks))} at most) and stopped for a task once "
              "its primary decisions were reached (or more seeds could not reach them); each look spends part of "
              "α (Pocock-type α-spending), so stopping early does not inflate the error." if len(looks) > 1 else "")
    return (f"Each comparison ends in a decision at a margin of ±{st['margin']:g} points (the smallest difference "
            f"that matters, set in the spec's decision.margin) with at most {100 * st['alpha']:g}% chance of a wrong "
            "'better' per family: one arm better, equivalent within the margin (two one-sided tests), no worse "
            "than the margin (non-inferiority), or undecided with the seeds it would take. Δ is first − second "
            "(negative: the first arm is better); its 95% interval includes the seeds' noise, the pick's luck "
            "(every race survivor was evaluated on the same seeds; their spread is the luck of picking one) and "
            "the test split's sampling. Primary comparisons (the spec's decision.primary) form one Holm family "
            "per task; the others a secondary one. A chosen value at the edge of its range makes a comparison "
            "inconclusive." + rounds + (f" {note}" if note else ""))


def answer_table(d: ReportData) -> Table:
    rows = [[f"{r.task} · {r.optimizer}", f"{label(r.arm)} − {label(r.reference)}", r.family, r.decision,
             err_ci(d.metric(r.task), r.test_error_diff, r.test_error_low, r.test_error_high),
             (f"±{100 * r.margin:g} pt" if d.metric(r.task).is_rate else f"±{r.margin:g}"),
             f"{r.n_pairs} of {r.seeds_max}", r.selection_included, r.caveats] for r in d.comparison.itertuples()]
    head = err_head(d.metrics(), "Δ test error, pts [95% CI]", "Δ test MSE [95% CI]")
    return Table("answer", ["task · optimizer", "comparison", "family", "decision", head, "margin",
                            "seeds", "pick's luck", "caveats"], rows, [1.9, 2.0, 1.7, 2.0, 2.3, 1.2, 1.1, 2.1, 3.4],
                 "The p-values behind each decision, the variance parts, the interval of the one-pick paired "
                 "t-test this replaces and the gap differences are in tables/comparison.csv.", ("caveats",))


def arm_label(d: ReportData, r) -> str:
    """The arm of a table row, with its replicate (``L2 · r2``) where the study has replicates."""
    rep = d.cells[r.cell].replicate if r.cell in d.cells else 0
    return label(r.regularizer) + (f" · r{rep + 1}" if rep else "")


def design_lines(d: ReportData) -> list[str]:
    cells = list(d.cells.values())
    tasks = sorted({c.task_name for c in cells})
    opts = sorted({c.optimizer_name for c in cells})
    regs = arms_in(c.regularizer for c in cells)
    c0 = cells[0]
    per_reg = {label(c.regularizer): c.budget for c in cells}
    budgets = (str(c0.budget) if len(set(per_reg.values())) == 1
               else ", ".join(f"{b} ({r})" for r, b in per_reg.items()))
    ranges = "; ".join(f"{label(c.regularizer)} {range_text(*c.searched_decay)}"
                       for c in sorted({c.regularizer: c for c in cells}.values(),
                                       key=lambda c: regs.index(c.regularizer)) if c.weight_decay_range)
    hours = compute_hours(d.trials, d.evals)
    compute = f"{hours['gpu_hours']:.2f} GPU-hours and {hours['cpu_hours']:.2f} CPU-hours"
    gen = f" in generations of {c0.batch}" if c0.batch else ""
    n_reps = 1 + max(c.replicate for c in cells)
    return [
        f"Tasks {', '.join(tasks)}; optimizers {', '.join(opts)}; arms {', '.join(label(r) for r in regs)} "
        "(the arm is the only difference between the cells of a task).",
        f"Search: {c0.sampler} sampler (seed {c0.seed}), {budgets} trials per cell{gen}, pruner "
        f"{c0.pruner}, objective {c0.objective} on a validation split carved out of the training data. "
        f"Learning rate {c0.lr_range[0]:.3g}–{c0.lr_range[1]:.3g} (log); λ {ranges} (log), each arm in "
        "its own convention.",
        f"Training: {c0.schedule} schedule; "
        f"{'all parameters regularized' if c0.decay_all else 'biases and normalization parameters not regularized'}.",
        (f"Selection: a race — each cell's best {c0.selection.top_k} search configurations re-run on seeds "
         f"{', '.join(map(str, c0.selection.seeds))} (validation split only); the lowest mean is the "
         "cell's pick." if c0.selection else
         "Selection: each cell's best search trial is its pick (one validation run; no race)."),
        f"Evaluation: each cell's chosen configuration (and, for the primary comparisons' arms, every race "
        f"survivor) retrained on seeds from {c0.eval_seeds[0]} "
        + (f"in rounds of {', '.join(map(str, c0.eval_rounds))} seeds, stopped once decided"
           if c0.eval_rounds else f"to {c0.eval_seeds[-1]}")
        + " (the same seeds for every arm: same initialization and data order) and measured once on the test "
        "split, which the search never saw. Train error is an eval-mode pass over the training split; the gap "
        "is test − train. Intervals are 95%." + (f" {d.regression_note()}" if d.regression_note() else ""),
        *([f"Replicates: {n_reps} — each cell's search, race and evaluation ran {n_reps} times on their own seeds "
           "(rows r2, r3, ...; the seeds above are the first replicate's); the comparisons pair the arms by "
           "replicate and rest on the spread of the replicates' differences (t with replicates − 1 degrees of "
           "freedom), which includes the luck of the pick."] if n_reps > 1 else []),
        f"Compute: {compute} of training (search and evaluation runs, each where it really trained).",
    ]


def chosen_table(d: ReportData) -> Table:
    rows = []
    for r in d.summary.itertuples():
        warn = "; ".join(w for w in (f"η at the {r.lr_edge}" if r.lr_edge else "",
                                     f"λ at the {r.weight_decay_edge}" if r.weight_decay_edge else "") if w)
        best = (pct(r.best_val) if d.rate(r.task)
                else num(r.best_val) if d.metric(r.task).is_rate else f"{num(r.best_val, '.4g')} MSE")
        picked = ("search" if r.picked_by == "search" else "—" if missing(r.race_rank) else
                  f"race: search #{int(r.race_rank)}{' (overturned)' if r.race_rank != 1 else ''}")
        rows.append([f"{r.task} · {r.optimizer}", arm_label(d, r), warn, best,
                     f"{num(r.lr)} ({r.lr_range})",
                     "—" if r.regularizer == "none" else f"{num(r.weight_decay)} ({r.weight_decay_range})",
                     num(r.shrink), "—" if missing(r.found_at) else f"{int(r.found_at)} of {r.searched}", picked])
    return Table("chosen", ["task · optimizer", "arm", "edge of range", "validation", "η (range)",
                            "λ (range)", "shrink η·λ", "found at trial", "picked by"], rows,
                 [2.2, 1.2, 1.6, 1.6, 2.0, 2.2, 1.1, 1.0, 1.7],
                 "The configuration each cell's search chose, by its validation result (one run). A value within "
                 "5% of the log-range "
                 "of an edge may have its optimum outside the range. Shrink: the per-step shrink the pair stands "
                 "for (λ for independent). Found at: its position in the search order — near the end, the "
                 "budget may not have sufficed. Picked by: the search's single run, or the race among its best "
                 "candidates (overturned: the race chose another than the search's best).", ("edge of range",))


def race_table(d: ReportData) -> Table:
    sel = d.selection.merge(d.summary[["cell", "task", "optimizer", "regularizer"]], on="cell")
    sel = sel.sort_values(["task", "optimizer", "regularizer", "search_rank"], key=arm_rank)
    def v(x, task):
        if d.rate(task):
            return pct(x)
        return num(x, ".4g") + ("" if d.metric(task).is_rate else " MSE")

    rows = [[f"{r.task} · {r.optimizer}", arm_label(d, r), str(r.search_rank), num(r.lr),
             "—" if r.regularizer == "none" else num(r.weight_decay), v(r.search_value, r.task),
             f"{v(r.race_mean, r.task)} (n = {r.race_n}){' diverged' if r.diverged else ''}",
             "yes" if r.survivor else "no", "chosen" if r.chosen else ""] for r in sel.itertuples()]
    return Table("race", ["task · optimizer", "arm", "search rank", "η", "λ", "search run", "race mean",
                          "survivor", "pick"], rows, [2.2, 1.2, 0.9, 1.2, 1.2, 1.3, 2.0, 1.0, 1.0],
                 "The race: each cell's best search candidates re-run on new seeds (validation split only); the "
                 "lowest race mean is the pick. Survivors: candidates the race could not show worse than the pick "
                 "by more than half the margin (their gap less a one-sided 95% bound of the race's pooled noise, "
                 "at least one validation example) — which of them became the pick is luck, so each is evaluated "
                 "too and their spread enters the decision's interval.")


def evaluation_table(d: ReportData) -> Table:
    rows = []
    for r in d.summary.itertuples():
        seeds = d.arms[r.cell][1] if r.cell in d.arms else len(d.cells[r.cell].eval_seeds)
        bad = f"{r.diverged_seeds} diverged" if r.diverged_seeds else ""
        m = d.metric(r.task)
        rows.append([f"{r.task} · {r.optimizer}", arm_label(d, r),
                     err_pm(m, r.test_error, r.test_error_low, r.test_error_high), err(m, r.train_error),
                     err_pm(m, r.gap_error, r.gap_error_low, r.gap_error_high, diff=True),
                     pm(r.gap_loss, r.gap_loss_low, r.gap_loss_high, scale=1, fmt="+.3f"),
                     num(r.weight_norm, ".3g"), pct(r.zero_fraction, 1), f"{r.seeds} of {seeds}", bad])
    ms = d.metrics()
    return Table("evaluation", ["task · optimizer", "arm", err_head(ms, "test error", "test MSE"),
                                err_head(ms, "train error", "train MSE"), err_head(ms, "gap, error pts", "gap, MSE"),
                                err_head(ms, "gap, loss (nats)", "gap, loss (MSE)"), "‖w‖₂", "exact zeros", "seeds",
                                "diverged"], rows,
                 [2.2, 1.2, 1.8, 1.2, 1.7, 1.8, 0.9, 1.0, 0.9, 1.1],
                 "Evaluation of the chosen configurations: mean ± half-width of the 95% interval over the seeds. "
                 "‖w‖₂ and exact zeros: the norm of the regularized weights at the end of training and the share of "
                 "them that are exactly 0 (mean over seeds) — L1 arms may set weights to zero, the others should not. "
                 "Diverged seeds are left out of the means and named in every comparison that uses the arm.",
                 ("diverged",))


def coupling_table(d: ReportData) -> Table:
    rows = [[f"{r.task} · {r.optimizer}", arm_label(d, r), f"{r.top_trials} of {r.of_trials}",
             f"{num(r.slope, '.2f')} [{num(r.slope_low, '.2f')}, {num(r.slope_high, '.2f')}]",
             f"{num(r.spearman_rho, '.2f')} [{num(r.rho_low, '.2f')}, {num(r.rho_high, '.2f')}]", r.reading,
             r.convention] for r in d.coupling.itertuples()]
    return Table("coupling", ["task · optimizer", "arm", "trials fitted", "slope [95% CI]", "Spearman ρ [95% CI]",
                              "reading", "what the slope means for this arm"], rows,
                 [2.1, 1.2, 1.1, 1.9, 1.9, 2.8, 3.6],
                 "Slope of log10 λ on log10 η over each cell's best trials. Only what an interval excludes is "
                 "read: one covering both 0 and −1 is inconclusive.")
