"""The README stays one page whose every command is run by CI, and the documentation site builds
with every spec field and every subcommand in its reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import reference  # noqa: E402  (the site's hook: docs/hooks/reference.py)


def readme_commands(text: str = README) -> list[str]:
    """Every command a page shows: its indented code lines and fenced shell blocks, comments and
    printed errors aside."""
    out, fence = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence in ("bash", "sh", "shell", "console") or (fence is None and line.startswith("    ")):
            cmd = line.strip()
            if cmd and not cmd.startswith(("#", "wdstudy: error:")):
                out.append(cmd)
    return out


def test_the_readme_is_one_page():
    assert len(README.splitlines()) <= 100


def test_the_strangers_path_is_on_the_first_screen():
    """Install, first run, main job and tests, in that order, within the first 60 lines."""
    first = "\n".join(README.splitlines()[:60])
    steps = ["pip install -e '.[dev]'", "python -m wdstudy launch examples/my_study.yaml",
             "python -m wdstudy launch studies/quickstart.yaml", "python -m pytest -q"]
    positions = [first.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), positions


def test_every_readme_command_is_run_by_ci():
    commands = readme_commands()
    assert len(commands) >= 5, commands
    ci_lines = {line.strip() for line in CI.splitlines()}
    for cmd in commands:
        # the docs build writes to a scratch site folder in CI; everything else is typed as shown
        assert cmd in ci_lines or (cmd.startswith("mkdocs build --strict") and any(
            line.startswith(cmd) for line in ci_lines)), f"README command not run by .ci/run: {cmd}"


def test_the_tutorials_commands_are_run_by_ci_as_it_says():
    page = (ROOT / "docs" / "tutorials" / "first-study.md").read_text()
    assert "Every command here is one that CI runs" in page
    ci_lines = {line.strip() for line in CI.splitlines()}
    commands = readme_commands(page)
    assert len(commands) >= 4 and [c for c in commands if c not in ci_lines] == []


def test_every_readme_link_exists():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_every_spec_field_is_described_and_every_description_names_a_field():
    rows = reference.field_rows()
    assert [path for _, path, _, _, meaning in rows if not meaning] == []
    paths = {path for _, path, _, _, _ in rows}
    extra = set(yaml.safe_load(reference.DESCRIPTIONS.read_text())) - paths
    assert extra == set(), extra
    # the walk covers the models the spec is made of: every nested model's fields are there
    for expected in ("search.weight_decay.axis", "tasks[].precision", "selection.top_k", "optimizers[].momentum"):
        assert expected in paths


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.integration
def test_the_site_builds_strict_with_the_generated_reference(site):
    spec_page = (site / "reference" / "spec" / "index.html").read_text()
    for _, path, _, _, _ in reference.field_rows():
        assert f"<code>{path}</code>" in spec_page, path
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    from wdstudy.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        assert f"wdstudy {name}" in cli_page
    assert "--version" in cli_page
    api_page = (site / "reference" / "api" / "index.html").read_text()
    for _, names in reference.API:
        for name in names:
            assert f"<code>{name}</code>" in api_page, name
    # the committed report's figures are served beside the pages that show them
    assert (site / "assets" / "quickstart" / "differences.png").is_file()
    tutorial = (site / "tutorials" / "first-study" / "index.html").read_text()
    assert "../../assets/quickstart/differences.png" in tutorial


@pytest.mark.integration
def test_every_docs_page_is_in_the_navigation(site):
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / ("index.html" if rel.name == "index" and rel.parent == Path(".") else rel / "index.html")
        assert built.is_file(), rel
    assert not (site / "hooks").exists()


@pytest.mark.integration
def test_the_printed_train_output_is_what_train_prints():
    """docs/how-to/one-run.md shows a command and its output: run it, and compare line by line with
    the numbers masked (they differ between CPUs; the format, labels and units must not)."""
    page = (ROOT / "docs" / "how-to" / "one-run.md").read_text()
    command = next(line.strip() for line in page.splitlines() if line.startswith("    python -m wdstudy train"))
    shown = page.split("```\n", 2)[1].split("```")[0].strip().splitlines()
    argv = command.split()[3:] + ["--epochs", "2"]  # after "python -m wdstudy"; masked numbers need no 30 epochs
    r = subprocess.run([sys.executable, "-m", "wdstudy", *argv], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    mask = lambda s: re.sub(r"\d+(\.\d+)?", "N", s.rstrip())  # noqa: E731
    assert [mask(x) for x in r.stdout.strip().splitlines()] == [mask(x) for x in shown]


def test_the_tutorials_error_line_is_what_launch_prints(tmp_path, monkeypatch, capsys):
    from wdstudy.cli import main

    page = (ROOT / "docs" / "tutorials" / "first-study.md").read_text()
    shown = next(line.strip() for line in page.splitlines() if line.strip().startswith("wdstudy: error:"))
    spec = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    spec["tasks"] = [{"name": "mlp-mnist", "epochs": 1}]
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "mine.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "studies/mine.yaml", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == shown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["studies"]  # nothing written
