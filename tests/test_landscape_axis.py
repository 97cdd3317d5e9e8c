"""The landscape figure over τ_epoch: the decoupled-decay arms' trials at the τ_epoch their runs
recorded, the band from one epoch to the training length, the searched range; L2 over λ."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from matplotlib.collections import PathCollection
from PIL import Image

from wdstudy.cli import main
from wdstudy.config import validate
from wdstudy.errors import WdstudyError
from wdstudy.report import build_report
from wdstudy.report.figures import BAND_COLOUR, drawing, fig_landscapes
from wdstudy.report.tables import compute_tables, load_report_data
from wdstudy.spec import StudySpec, load_spec
from wdstudy.storage import open_storage
from wdstudy.synthetic import fill

EPOCHS = 7  # the synthetic runs' length: the band's upper line


def spec_dict(tmp: Path, name: str, decoupled: dict) -> dict:
    return {
        "name": name,
        "tasks": [{"name": "mlp-mnist1d", "epochs": EPOCHS}],
        "optimizers": ["adam"],
        "regularizers": ["l2", "decoupled", "independent"],
        "search": {"lr": {"low": 1e-3, "high": 1e-1},
                   "weight_decay": {"l2": {"low": 1e-5, "high": 1e-2}, "decoupled": decoupled,
                                    "independent": {"low": 1e-5, "high": 1e-2}},
                   "sampler": "random", "trials": 12},
        "evaluation": {"seeds": 2},
        "output": str(tmp / "out"),
    }


LAMBDA = {"low": 1e-2, "high": 10}  # the decoupled arm searched over λ
TAU = {"low": 0.5, "high": 500, "axis": "timescale_epochs"}  # ... or over τ_epoch


def synthetic(tmp: Path, name: str, decoupled: dict):
    spec = validate(StudySpec, spec_dict(tmp, name, decoupled))
    url = str(tmp / "out" / "optuna.journal")
    fill(spec, open_storage(url), seeds=2, epochs=EPOCHS)
    return spec, url


@pytest.fixture(scope="module")
def by_lambda(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("lam"), "lam", LAMBDA)


@pytest.fixture(scope="module")
def by_tau(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("tau"), "tau", TAU)


def landscape(url: str, study: str, axis: str):
    """The report's data and its landscape figure drawn with ``axis``: {arm: its panel}."""
    d = load_report_data(open_storage(url), study, url)
    d.landscape_axis = axis
    compute_tables(d, importance=False)
    with drawing():
        f = fig_landscapes(d)
    assert f is not None
    panels = {ax.get_title().split("\n")[-1].split(" · ")[-1]: ax for ax in f.fig.axes if ax.get_title()}
    return d, f, panels


def points(ax) -> list[np.ndarray]:
    """The (η, y) offsets of a panel's scatters, in drawing order: trials, (pruned,) the ★ pick."""
    return [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]


def band(ax) -> list[float]:
    """The y of the panel's horizontal band lines."""
    return sorted(float(line.get_ydata()[0]) for line in ax.get_lines()
                  if line.get_color() == BAND_COLOUR and len(set(line.get_ydata())) == 1)


def dashed(ax) -> list[np.ndarray]:
    return [np.column_stack([line.get_xdata(), line.get_ydata()]) for line in ax.get_lines()
            if line.get_linestyle() == "--"]


def by_lr(t, col: str) -> np.ndarray:
    return t.sort_values("lr")[col].to_numpy(float)


@pytest.mark.parametrize("arm", ["decoupled", "independent"])
def test_decoupled_panels_over_tau_epoch_put_each_trial_at_its_recorded_timescale(by_lambda, arm):
    spec, url = by_lambda
    d, f, panels = landscape(url, "lam", "tau_epoch")
    ax = panels[arm]
    assert "τ_epoch" in ax.get_ylabel()
    cell = f"lam/mlp-mnist1d/adam/{arm}"
    done = d.complete(cell)
    trials, star = points(ax)[0], points(ax)[-1]
    order = np.argsort(trials[:, 0])
    assert np.allclose(trials[order, 0], by_lr(done, "lr"))
    assert np.allclose(trials[order, 1], by_lr(done, "tau_epoch"), rtol=1e-12)
    # the recorded τ_epoch is the timescale of the trial's (η, λ): 1/(η·λ·steps per epoch), 1/λ·… for independent
    rate = done.weight_decay if arm == "independent" else done.lr * done.weight_decay
    assert np.allclose(done.tau_epoch, 1 / (rate * done.steps_per_epoch))
    pick = done[done.chosen].iloc[0]
    assert star.tolist() == [[pytest.approx(pick.lr), pytest.approx(pick.tau_epoch)]]
    assert band(ax) == [1.0, float(EPOCHS)]
    labels = [t.get_text() for t in ax.texts]
    assert "1 epoch" in labels and f"training length: {EPOCHS} epochs" in labels
    lo, hi = ax.get_ylim()
    assert lo < 1.0 and hi > EPOCHS  # the band is inside the panel
    plt.close(f.fig)


def test_over_tau_epoch_the_lambda_range_of_a_decoupled_arm_is_a_diagonal_dashed_band(by_lambda):
    spec, url = by_lambda
    d, f, panels = landscape(url, "lam", "tau_epoch")
    spe = float(d.trials.steps_per_epoch.median())
    ends = dashed(panels["decoupled"])
    assert len(ends) == 2
    for line, lam in zip(ends, (LAMBDA["low"], LAMBDA["high"])):
        assert np.allclose(line[:, 1], 1 / (line[:, 0] * lam * spe))  # τ_epoch of λ's end at each η
    plt.close(f.fig)


def test_the_l2_panel_stays_over_lambda_and_the_caption_says_why(by_lambda):
    spec, url = by_lambda
    d, f, panels = landscape(url, "lam", "tau_epoch")
    ax = panels["L2"]
    assert ax.get_ylabel() == "λ (L2)" and band(ax) == []
    trials = points(ax)[0]
    assert np.allclose(np.sort(trials[:, 1]), np.sort(d.complete("lam/mlp-mnist1d/adam/l2").weight_decay))
    assert "τ_epoch" in f.title
    assert "Panels of L2: over λ" in f.caption and "no decoupled timescale" in f.caption
    assert "one epoch and the training length" in f.caption and "Wang & Aitchison, ICML 2025" in f.caption
    plt.close(f.fig)


@pytest.mark.parametrize("axis", ["lambda", "auto"])
def test_without_the_option_a_lambda_searched_study_is_drawn_over_lambda(by_lambda, axis):
    spec, url = by_lambda
    d, f, panels = landscape(url, "lam", axis)
    for arm, reg in (("decoupled", "decoupled"), ("independent", "independent"), ("L2", "l2")):
        ax = panels[arm]
        assert ax.get_ylabel() == f"λ ({arm})" and band(ax) == []
        trials = points(ax)[0]
        assert np.allclose(np.sort(trials[:, 1]), np.sort(d.complete(f"lam/mlp-mnist1d/adam/{reg}").weight_decay))
    assert f.title == "Landscapes over (η, λ)" and "τ_epoch" not in f.caption
    plt.close(f.fig)


def test_auto_draws_tau_epoch_where_the_decoupled_arm_was_searched_over_it(by_tau):
    spec, url = by_tau
    d, f, panels = landscape(url, "tau", "auto")
    ax = panels["decoupled"]
    assert "τ_epoch" in ax.get_ylabel() and band(ax) == [1.0, float(EPOCHS)]
    done = d.complete("tau/mlp-mnist1d/adam/decoupled")
    assert np.allclose(np.sort(points(ax)[0][:, 1]), np.sort(done.tau_epoch))
    # the searched range, dashed at its two ends, which are τ_epoch values themselves
    assert sorted(float(line[0, 1]) for line in dashed(ax)) == [pytest.approx(TAU["low"]), pytest.approx(TAU["high"])]
    assert all(np.allclose(line[:, 1], line[0, 1]) for line in dashed(ax))
    assert done.tau_epoch.between(TAU["low"] * (1 - 1e-9), TAU["high"] * (1 + 1e-9)).all()
    plt.close(f.fig)
    d, f, panels = landscape(url, "tau", "lambda")  # asked for λ: λ it is
    assert panels["decoupled"].get_ylabel() == "λ (decoupled)"
    plt.close(f.fig)


def write_spec(spec, tmp: Path, **report) -> Path:
    path = tmp / "spec.yaml"
    data = spec.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump({**data, "report": report} if report else data))
    return path


@pytest.mark.integration
def test_the_spec_field_and_the_flag_choose_the_axis_of_the_written_report(by_lambda, tmp_path, capsys):
    spec, url = by_lambda
    out = Path(spec.output)
    path = write_spec(spec, tmp_path, landscape_axis="tau_epoch")
    assert load_spec(path).report.landscape_axis == "tau_epoch"
    assert main(["report", str(path)]) == 0
    page = (out / "report.html").read_text()
    assert "Landscapes over (η, λ) and (η, τ_epoch)" in page and "Wang &amp; Aitchison" in page
    pixels = np.asarray(Image.open(out / "figures" / "landscapes.png").convert("L"))  # nothing cut at an edge
    edges = np.concatenate([pixels[:, :3].ravel(), pixels[:, -3:].ravel(), pixels[:3].ravel(), pixels[-3:].ravel()])
    assert edges.min() > 200
    assert main(["report", str(path), "--landscape-axis", "lambda"]) == 0  # the flag overrides the spec
    page = (out / "report.html").read_text()
    assert "Landscapes over (η, λ)" in page and "(η, τ_epoch)" not in page
    capsys.readouterr()


def test_a_bad_axis_is_one_error_line_naming_the_flag_or_the_key(by_lambda, tmp_path, capsys):
    spec, url = by_lambda
    path = write_spec(spec, tmp_path)
    assert main(["report", str(path), "--landscape-axis", "tau"]) == 2
    err = capsys.readouterr().err
    assert err == "wdstudy: error: --landscape-axis='tau': choose auto, lambda or tau_epoch\n"
    assert main(["launch", str(path), "--landscape-axis", "epochs"]) == 2  # refused before anything trains
    assert capsys.readouterr().err == "wdstudy: error: --landscape-axis='epochs': choose auto, lambda or tau_epoch\n"
    bad = write_spec(spec, tmp_path, landscape_axis="lambada")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(bad) in err and "report.landscape_axis='lambada'" in err
    with pytest.raises(WdstudyError, match=r"^landscape_axis='λ': choose auto, lambda or tau_epoch$"):
        build_report(open_storage(url), "lam", tmp_path / "x", url, landscape_axis="λ")
