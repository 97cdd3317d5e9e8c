"""Reports: statistics against scipy, a real tiny study end to end, partial studies, escaping."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image
from pypdf import PdfReader
from scipy import stats as st

from wdstudy.cells import ensure_studies
from wdstudy.config import validate
from wdstudy.report import SECTIONS, build_report
from wdstudy.spec import StudySpec
from wdstudy.stats import coupling, mean_ci
from wdstudy.storage import open_storage
from wdstudy.synthetic import add_evaluation, add_trials, fill
from wdstudy.worker import Worker

# -- statistics against scipy ---------------------------------------------------------------

A = [0.112, 0.098, 0.105, 0.121, 0.101]


def test_mean_ci_matches_scipy_t_interval():
    ci = mean_ci(A)
    lo, hi = st.t.interval(0.95, df=len(A) - 1, loc=np.mean(A), scale=st.sem(A))
    assert ci.mean == pytest.approx(np.mean(A), abs=1e-15)
    assert (ci.low, ci.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert ci.n == 5
    one = mean_ci([0.3])
    assert one.mean == 0.3 and math.isnan(one.low)


def test_coupling_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, -1, 40)
    y = -x - 6 + rng.normal(0, 0.2, 40)
    c = coupling(x, y)
    fit = st.linregress(x, y)
    q = st.t.ppf(0.975, 38)
    assert c.slope == pytest.approx(fit.slope, rel=1e-12)
    assert (c.slope_low, c.slope_high) == (pytest.approx(fit.slope - q * fit.stderr), pytest.approx(fit.slope + q * fit.stderr))
    assert c.rho == pytest.approx(st.spearmanr(x, y).statistic, rel=1e-12)
    assert c.rho_low <= c.rho <= c.rho_high and c.rho_high < -0.8  # strongly coupled
    flat = coupling(x, rng.uniform(-3, 0, 40))
    assert flat.rho_low < 0 < flat.rho_high  # independent: the interval covers 0


# -- a tiny real study ------------------------------------------------------------------------


def tiny_spec(tmp_path: Path, name: str = "rep") -> StudySpec:
    return validate(StudySpec, {
        "name": name,
        "tasks": [{"name": "mlp-mnist1d", "width": 16, "max_train": 400, "epochs": 2}],
        "optimizers": ["adam"],
        "regularizers": ["l2", "decoupled"],
        "search": {"lr": {"low": 1e-3, "high": 1e-2},
                   "weight_decay": {"l2": {"low": 1e-5, "high": 1e-2}, "decoupled": {"low": 1e-2, "high": 10}},
                   "sampler": "random", "trials": 5},
        "evaluation": {"seeds": 3},
        "output": str(tmp_path / "out"),
    })


class Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k == "id":
                self.ids.append(v)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    spec = tiny_spec(tmp)
    url = str(tmp / "out" / "optuna.journal")
    storage = open_storage(url)
    ensure_studies(spec, storage, "name: rep\n")
    Worker(spec, url, poll=0.2, log=lambda m: None).run()
    paths = build_report(open_storage(url), "rep", tmp / "out", url)
    return spec, url, paths


@pytest.mark.integration
def test_html_has_every_section_and_cell(real_report):
    spec, url, paths = real_report
    page = paths.html.read_text()
    parser = Sections()
    parser.feed(page)
    for key, title in SECTIONS:
        assert key in parser.ids and title in page
    for cell in spec.cells():
        assert cell.task.name in page
    assert page.count("<figure") == len(paths.figures) >= 5
    assert "http://" not in page.replace("http://www.w3.org", "") and "<script" not in page  # self-contained
    assert "paired" in page and "Holm" in page


@pytest.mark.integration
def test_pdf_outline_metadata_pages_and_numbers(real_report):
    spec, url, paths = real_report
    reader = PdfReader(str(paths.pdf))
    assert [o.title for o in reader.outline] == [title for _, title in SECTIONS]  # a bookmark per section, in order
    assert reader.metadata.title == "wdstudy report: rep" and "L2" in reader.metadata.subject
    texts = [p.extract_text() for p in reader.pages]
    for i, t in enumerate(texts):  # no page holding a stray line: each carries a table, a figure or a listing
        assert len(t) > 400, f"page {i + 1} holds only {t!r}"
    text = " ".join(texts)
    summary = pd.read_csv(paths.tables[0])
    for r in summary.itertuples():
        assert f"{100 * r.test_error:.2f} ±" in text
        assert f"{100 * r.gap_error:+.2f}" in text
        assert f"{r.lr:.3g}" in text


@pytest.mark.integration
def test_first_page_verdicts_match_the_comparison_table(real_report):
    spec, url, paths = real_report
    first = " ".join(PdfReader(str(paths.pdf)).pages[0].extract_text().split())
    comparison = pd.read_csv(paths.tables[1], keep_default_na=False)
    assert len(comparison)
    for r in comparison.itertuples():
        assert r.outcome in first
        for caveat in filter(None, str(r.caveats).split("; ")):
            assert " ".join(caveat.split()[:4]) in first  # the caveat is typeset beside the outcome
        assert f"{100 * r.test_error_diff:+.2f} [{100 * r.test_error_low:+.2f}" in first
    html_page = paths.html.read_text()
    answer = html_page[html_page.index('id="answer"'):html_page.index('id="design"')]
    for r in comparison.itertuples():
        assert r.outcome in answer


@pytest.mark.integration
def test_html_tables_wrap_inside_their_box(real_report):
    spec, url, paths = real_report
    page = paths.html.read_text()
    assert page.count('<div class="tw"') == page.count("<table>") >= 4  # every table scrolls in its own box
    assert "td.wrap{white-space:normal" in page and 'class="wrap' in page  # long text wraps
    for alt in re.findall(r'<img alt="([^"]*)"', page):
        assert len(alt) > 20  # figures carry a description


@pytest.mark.integration
def test_summary_numbers_equal_the_storage(real_report):
    spec, url, paths = real_report
    storage = open_storage(url)
    summary = pd.read_csv(paths.tables[0]).set_index("regularizer")
    comparison = pd.read_csv(paths.tables[1])
    tests = {}
    for cell in spec.cells():
        search = optuna.load_study(study_name=cell.name, storage=storage)
        ev = optuna.load_study(study_name=cell.eval_name, storage=storage)
        runs = ev.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        test = np.array([t.user_attrs["test_error"] for t in runs])
        gap = np.array([t.user_attrs["test_error"] - t.user_attrs["train_error"] for t in runs])
        row = summary.loc[cell.regularizer]
        assert row.best_val == search.best_value
        assert row.lr == search.best_params["lr"]
        assert row.weight_decay == search.best_params["weight_decay"]
        assert row.seeds == len(runs) == 3
        assert row.test_error == pytest.approx(test.mean(), abs=1e-12)
        lo, hi = st.t.interval(0.95, len(test) - 1, loc=test.mean(), scale=st.sem(test))
        assert (row.test_error_low, row.test_error_high) == (pytest.approx(lo), pytest.approx(hi))
        assert row.gap_error == pytest.approx(gap.mean(), abs=1e-12)
        tests[cell.regularizer] = [t.user_attrs["test_error"] for t in sorted(runs, key=lambda t: t.user_attrs["seed"])]
    p = st.ttest_rel(tests["decoupled"], tests["l2"]).pvalue  # the arms share their seeds: paired
    row = comparison[(comparison.arm == "decoupled") & (comparison.reference == "l2")].iloc[0]
    assert row.p_naive == pytest.approx(p) and row.n_pairs == 3  # the one-pick paired t-test, for reference
    assert row.family == "primary" and row.decision_code in ("A better", "B better", "equivalent", "A no worse",
                                                             "B no worse", "undecided")


@pytest.mark.integration
def test_figures_and_tables_written(real_report):
    spec, url, paths = real_report
    names = {p.stem for p in paths.figures}
    assert names == {"differences", "seeds", "slices", "landscapes", "coupling", "best_so_far", "tuning",
                     "curves", "importance", "angular", "norms"}  # tuning curves: the tiny spec's search is random
    for p in paths.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # nothing drawn in the outer 3 pixels: no tick label or title is cut at an edge of the image
        pixels = np.asarray(Image.open(p).convert("L"))
        edges = np.concatenate([pixels[:, :3].ravel(), pixels[:, -3:].ravel(), pixels[:3].ravel(), pixels[-3:].ravel()])
        assert edges.min() > 200, f"{p.name}: something is drawn at the image's edge"
    assert {p.stem for p in paths.tables} == {"summary", "comparison", "selection", "pruning", "coupling",
                                              "importance", "trial_counts", "meaning", "diagnostics"}


# -- partial studies and hostile names -----------------------------------------------------------


@pytest.mark.integration
def test_failed_and_running_cells_are_reported(tmp_path):
    spec = tiny_spec(tmp_path, name="partial")
    url = str(tmp_path / "j.journal")
    storage = open_storage(url)
    ensure_studies(spec, storage, "name: partial\n")
    rng = np.random.default_rng(0)
    l2, dec = spec.cells()
    add_trials(spec, l2, storage, 5, 3, rng)
    add_evaluation(spec, l2, storage, 3, 3, rng)
    add_trials(spec, dec, storage, 2, 3, rng)
    add_trials(spec, dec, storage, 1, 3, rng, state=optuna.trial.TrialState.FAIL)
    optuna.load_study(study_name=dec.name, storage=storage).ask()  # left RUNNING
    paths = build_report(open_storage(url), "partial", tmp_path / "out", url)
    page = paths.html.read_text()
    assert "This study is not finished" in page and "1 running" in page
    assert "1 run(s) failed" in page
    pdf_text = PdfReader(str(paths.pdf)).pages[0].extract_text()
    assert "not finished" in pdf_text and "failed" in pdf_text
    counts = pd.read_csv(tmp_path / "out" / "tables" / "trial_counts.csv").set_index("cell")
    assert counts.loc["mlp-mnist1d/adam/decoupled", "fail"] == 1
    assert counts.loc["mlp-mnist1d/adam/decoupled", "running"] == 1


@pytest.mark.integration
def test_user_strings_are_escaped(tmp_path):
    spec = tiny_spec(tmp_path, name="esc")
    url = str(tmp_path / "j.journal")
    storage = open_storage(url)
    fill(spec, storage, trials=6, seeds=2, epochs=3)
    evil = "<script>alert('x')</script>"
    # a storage written by another tool may hold any names: rename a task and add one to the spec text
    for s in storage.get_all_studies():
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        if "cell" in s.user_attrs:
            cell = s.user_attrs["cell"]
            cell["task"]["name"] = evil
            study.set_user_attr("cell", cell)
            study.set_user_attr("spec_yaml", f"name: esc\ndescription: {evil}\n")
    paths = build_report(open_storage(url), "esc", tmp_path / "out", f"{url}?<b>bold</b>")
    page = paths.html.read_text()
    assert "<script" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert re.search(r"&lt;b&gt;bold", page)


@pytest.mark.integration
def test_report_cli_rebuilds_from_storage(real_report, tmp_path, capsys):
    import yaml

    from wdstudy.cli import main

    spec, url, paths = real_report
    path = tmp_path / "rep.yaml"
    path.write_text(yaml.safe_dump({**spec.model_dump(mode="json", exclude_none=True), "output": str(Path(url).parent)}))
    before = paths.html.stat().st_mtime_ns
    assert main(["report", str(path)]) == 0
    assert paths.html.stat().st_mtime_ns > before
    assert "report.html" in capsys.readouterr().out
    missing = tmp_path / "none.yaml"
    missing.write_text(yaml.safe_dump({**spec.model_dump(mode="json", exclude_none=True), "output": str(tmp_path / "x")}))
    assert main(["report", str(missing)]) == 2


def test_report_of_a_study_without_trials(tmp_path):
    spec = tiny_spec(tmp_path, name="empty")
    url = str(tmp_path / "j.journal")
    ensure_studies(spec, open_storage(url), "name: empty\n")
    paths = build_report(open_storage(url), "empty", tmp_path / "out", url)
    page = paths.html.read_text()
    assert "This study is not finished: 0 of 10 search trials done" in page
    reader = PdfReader(str(paths.pdf))
    assert [o.title for o in reader.outline] == [title for _, title in SECTIONS]
    first = " ".join(reader.pages[0].extract_text().split())
    assert "not tested" in first and "fewer than 2 seeds completed by both" in first


# -- a regression task: its error is the MSE, and the report says so --------------------------------


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory):
    """A real tiny study with a classification task and the regression task, both arms."""
    tmp = tmp_path_factory.mktemp("mixed")
    spec = validate(StudySpec, {
        "name": "mix",
        "tasks": [{"name": "mlp-mnist1d", "width": 8, "max_train": 300, "epochs": 1},
                  {"name": "linreg-curve1d", "epochs": 10}],
        "optimizers": ["adam"],
        "regularizers": ["l2", "decoupled"],
        "search": {"lr": {"low": 1e-2, "high": 1e-1},
                   "weight_decay": {"l2": {"low": 1e-5, "high": 1e-2}, "decoupled": {"low": 1e-2, "high": 10}},
                   "sampler": "random", "trials": 4},
        "evaluation": {"seeds": 2},
        "output": str(tmp / "out"),
    })
    url = str(tmp / "out" / "optuna.journal")
    ensure_studies(spec, open_storage(url), "name: mix\n")
    Worker(spec, url, poll=0.2, log=lambda m: None).run()
    paths = build_report(open_storage(url), "mix", tmp / "out", url)
    return spec, url, paths


@pytest.mark.integration
def test_a_regression_cell_stores_its_mse_as_the_error(mixed_report):
    from wdstudy.analysis import evaluations_frame, trials_frame

    spec, url, paths = mixed_report
    storage = open_storage(url)
    trials, evals = trials_frame(storage, "mix"), evaluations_frame(storage, "mix")
    assert set(trials[trials.task == "linreg-curve1d"].metric) == {"mse"}
    assert set(trials[trials.task == "mlp-mnist1d"].metric) == {"error"}
    for cell in spec.cells():
        done = optuna.load_study(study_name=cell.name, storage=storage).get_trials(
            states=(optuna.trial.TrialState.COMPLETE,))
        assert len(done) == 4
        mse = " (MSE)" if cell.task.name == "linreg-curve1d" else ""  # what the dashboard labels the axes
        assert optuna.load_study(study_name=cell.name, storage=storage).metric_names == [f"val_error{mse}"]
        assert optuna.load_study(study_name=cell.eval_name, storage=storage).metric_names == [f"test_error{mse}"]
        for t in done:  # the search minimized val_error: for the regression that is its MSE, equal to its loss
            assert t.value == t.user_attrs["val_error"]
            if cell.task.name == "linreg-curve1d":
                assert t.user_attrs["val_error"] == pytest.approx(t.user_attrs["val_loss"], rel=1e-6)
            else:
                assert t.user_attrs["val_error"] != t.user_attrs["val_loss"]
    e = evals[(evals.task == "linreg-curve1d") & (evals.state == "COMPLETE")]
    assert len(e) == 4 and np.allclose(e.test_error, e.test_loss, rtol=1e-6)
    assert np.allclose(e.gap_error, e.test_error - e.train_error)
    summary = pd.read_csv(paths.tables[0])
    assert set(summary[summary.task == "linreg-curve1d"].metric) == {"mse"}
    assert summary[summary.task == "linreg-curve1d"].val_se.isna().all()  # no binomial s.e. for an MSE
    assert summary[summary.task == "mlp-mnist1d"].val_se.notna().all()
    comparison = pd.read_csv(paths.tables[1])
    row = comparison[comparison.task == "linreg-curve1d"].iloc[0]
    assert row.metric == "mse" and "test MSE" in row.verdict and "pts" not in row.verdict


@pytest.mark.integration
def test_the_report_labels_a_regression_cell_mse(mixed_report):
    from wdstudy.report import compute_tables, load_report_data
    from wdstudy.report.document import answer_table, chosen_table, evaluation_table
    from wdstudy.report.figures import fig_curves, fig_differences, fig_seeds, fig_slices

    spec, url, paths = mixed_report
    d = load_report_data(open_storage(url), "mix", url)
    compute_tables(d, importance=False)
    ev = evaluation_table(d)
    assert ev.head[2:6] == ["test error / test MSE", "train error / train MSE", "gap, error pts / gap, MSE",
                            "gap, loss (nats) / gap, loss (MSE)"]
    for row in ev.rows:
        if row[0].startswith("linreg-curve1d"):
            assert all(c.endswith(" MSE") for c in row[2:5]) and "%" not in "".join(row[2:5])
        else:
            assert row[2].endswith("%") and row[3].endswith("%") and "MSE" not in "".join(row[2:5])
    for row in chosen_table(d).rows:
        assert row[3].endswith(" MSE") == row[0].startswith("linreg-curve1d")
        assert ("%" in row[3]) == row[0].startswith("mlp-mnist1d")
    answer = answer_table(d)
    assert answer.head[4] == "Δ test error, pts [95% CI] / Δ test MSE [95% CI]"
    assert all(r[4].endswith(" MSE") == r[0].startswith("linreg") for r in answer.rows)

    import matplotlib.pyplot as plt

    seeds = fig_seeds(d).fig
    labels = [ax.get_ylabel() for ax in seeds.axes]
    titles = [ax.get_title() for ax in seeds.axes]
    col = {t.split(" ·")[0]: i for i, t in enumerate(titles) if t}
    assert labels[col["mlp-mnist1d"]] == "test error (%)" and labels[col["linreg-curve1d"]] == "test MSE"
    curves = fig_curves(d).fig
    ylabels = [ax.get_ylabel() for ax in curves.axes]
    assert "linreg-curve1d\nMSE" in ylabels and "mlp-mnist1d\nerror (%)" in ylabels and "MSE" in ylabels
    slices = fig_slices(d).fig
    assert {"validation error (%)", "validation MSE"} <= {ax.get_ylabel() for ax in slices.axes}
    diffs = fig_differences(d)
    assert {"Δ test error (points)", "Δ test MSE"} <= {ax.get_xlabel() for ax in diffs.fig.axes}
    points = [ax for ax in diffs.fig.axes if ax.get_xlabel() == "Δ test error (points)"][0]
    ticks = [t.get_text() for t in points.get_xticklabels()]
    assert "0" in ticks and "2" in ticks and "−2" in ticks and not any("^" in t for t in ticks), ticks
    assert "linreg-curve1d (regression) the error is the mean squared error" in diffs.caption
    for f in (seeds, curves, slices, diffs.fig):
        plt.close(f)
    page = paths.html.read_text()
    assert "test error / test MSE" in page and "(regression) the error is the mean squared error (MSE)" in page


def test_importing_the_report_changes_no_matplotlib_setting():
    """The report's matplotlib style applies while a figure is drawn, not to a program that imports it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import matplotlib
        before = dict(matplotlib.rcParams)
        import wdstudy.claims, wdstudy.report
        from wdstudy.report.figures import STYLE, drawing
        assert dict(matplotlib.rcParams) == before
        with drawing():
            assert all(matplotlib.rcParams[k] == v for k, v in STYLE.items())
            assert matplotlib.get_backend().lower() == "agg"
        assert matplotlib.rcParams["font.size"] == before["font.size"] != STYLE["font.size"]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_two_writers_of_one_output_do_not_collide_and_a_failed_one_leaves_the_old_file(tmp_path):
    """Two launches of one study end together and both write the report: each output goes to a
    temporary file of its own and is moved over the old one whole (a shared ``report.pdf.tmp``
    made the second writer's move fail: the first had moved it away)."""
    import os

    from wdstudy.outputs import replacing

    path = tmp_path / "report.pdf"
    with replacing(path) as first:
        with replacing(path) as second:
            first.write_bytes(b"A" * 10)
            second.write_bytes(b"B" * 5)
        assert path.read_bytes() == b"B" * 5
    assert path.read_bytes() == b"A" * 10  # the last to finish wins, whole
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"A" * 10 and [p.name for p in tmp_path.iterdir()] == ["report.pdf"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as a plain open would have made it
