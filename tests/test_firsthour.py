"""A newcomer's mistakes and environment: each ends in one readable line and a non-zero exit,
before anything is written, never in a traceback (the command line, in-process, so an
unexpected exception fails the test)."""

from __future__ import annotations

import copy
import importlib.metadata
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from wdstudy.cli import main
from wdstudy.config import validate
from wdstudy.errors import WdstudyError
from wdstudy.preflight import DATA_FILES, check_data
from wdstudy.spec import StudySpec, load_spec

BASE = {
    "name": "newcomer",
    "tasks": [{"name": "mlp-mnist1d", "epochs": 1, "width": 8}],
    "optimizers": ["adam"],
    "regularizers": ["none", "l2", "decoupled"],
    "search": {"lr": {"low": 1e-3, "high": 1e-1}, "weight_decay": {"low": 1e-6, "high": 1e-1},
               "sampler": "random", "trials": 1, "batch": 1},
    "evaluation": {"seeds": 1},
}


def write_spec(tmp_path: Path, **changes) -> Path:
    data = copy.deepcopy(BASE)
    data["output"] = str(tmp_path / "out")
    data.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_main(argv, capsys) -> tuple[int, str]:
    """``main(argv)``: its exit code (argparse's too) and stderr; any other exception fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wdstudy: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- validate before writing -------------------------------------------------------------------


def test_a_misspelt_embedded_task_stops_launch_before_anything_is_written(tmp_path, capsys):
    spec = write_spec(tmp_path, tasks=[{"name": "mlp-mnist", "epochs": 1}])
    code, err = run_main(["launch", spec, "--quiet", "--workers", "1"], capsys)
    line = one_error_line(err)
    assert code == 2
    assert f"{spec}: tasks.0.data_dir=None" in line and "did you mean mlp-mnist1d" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset", sorted(DATA_FILES))
def test_a_files_dataset_is_checked_for_its_files(tmp_path, dataset):
    root = tmp_path / "data"
    spec = validate(StudySpec, {**BASE, "tasks": [{"name": f"cnn-{dataset}", "data_dir": str(root)}]})
    with pytest.raises(WdstudyError, match=r"tasks\.0\.data_dir=.*no such folder"):
        check_data(spec)
    root.mkdir()
    first, *rest = DATA_FILES[dataset]
    for f in rest:  # all but one, in torchvision's layout
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")
    with pytest.raises(WdstudyError, match=rf"1 of the {len(DATA_FILES[dataset])} files .* missing, e.g. {first}"):
        check_data(spec)
    (root / first).parent.mkdir(parents=True, exist_ok=True)
    (root / first).write_bytes(b"")
    check_data(spec)  # every file there: nothing to say


@pytest.mark.parametrize("dataset", sorted(DATA_FILES))
def test_the_checked_files_are_the_ones_torchvision_reads(tmp_path, dataset):
    """torchvision is the reference: where the check passes, it loads the data; take one of the
    checked files away and both refuse."""
    from wdstudy.tasks.data import load_data

    from .conftest import write_cifar10, write_mnist_like

    if dataset == "cifar10":
        write_cifar10(tmp_path)
    else:
        write_mnist_like(tmp_path, {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}[dataset])
    spec = validate(StudySpec, {**BASE, "tasks": [{"name": f"cnn-{dataset}", "data_dir": str(tmp_path)}]})
    check_data(spec)
    assert len(load_data(dataset, data_dir=str(tmp_path), with_test=True).test) > 0
    (tmp_path / DATA_FILES[dataset][-1]).unlink()
    with pytest.raises(WdstudyError, match="missing"):
        check_data(spec)
    with pytest.raises(WdstudyError, match="not found"):
        load_data(dataset, data_dir=str(tmp_path), with_test=True)


# -- no traceback for the environment ----------------------------------------------------------


def test_an_output_under_a_plain_file_is_refused(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    spec = write_spec(tmp_path, output=str(tmp_path / "plain" / "out"))
    code, err = run_main(["launch", spec, "--quiet", "--workers", "1"], capsys)
    line = one_error_line(err)
    assert code == 2 and "output=" in line and f"{tmp_path / 'plain'} is a file, not a folder" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "spec.yaml"]


def test_an_output_where_nothing_can_be_created_is_refused(tmp_path, capsys):
    spec = write_spec(tmp_path, output="/proc/wdstudy-out")
    code, err = run_main(["launch", spec, "--quiet", "--workers", "1"], capsys)
    line = one_error_line(err)
    assert code == 2 and "output='/proc/wdstudy-out': cannot write in /proc" in line, line


@pytest.mark.parametrize("storage", ["/proc/wdstudy.journal", "/proc/version"])
def test_a_storage_that_cannot_be_written_is_refused(tmp_path, capsys, storage):
    spec = write_spec(tmp_path)
    code, err = run_main(["launch", spec, "--quiet", "--workers", "1", "--storage", storage], capsys)
    line = one_error_line(err)
    assert code == 2 and f"storage={storage!r}: cannot" in line, line
    assert not (tmp_path / "out").exists()


def test_an_unreachable_database_is_named_without_its_password(tmp_path, capsys):
    spec = write_spec(tmp_path)
    url = "postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere"
    code, err = run_main(["launch", spec, "--quiet", "--workers", "1", "--storage", url], capsys)
    line = one_error_line(err)
    assert code == 2 and "postgresql://someone:***@127.0.0.1:1/nowhere" in line and "cannot connect" in line, line
    assert "s3cret" not in err
    code, err = run_main(["status", spec, "--storage", url], capsys)  # the storage's own message too
    assert code == 2 and "s3cret" not in err and "Traceback" not in err, err


def test_a_full_disk_is_refused_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WDSTUDY_MIN_FREE_MB", str(10**12))  # more than any disk here has
    spec = write_spec(tmp_path)
    code, err = run_main(["launch", spec, "--quiet", "--workers", "1"], capsys)
    line = one_error_line(err)
    assert code == 2 and "MB free on the disk of" in line and "at least 1000000000000 MB" in line, line
    assert not (tmp_path / "out").exists()


def test_a_busy_dashboard_port_is_one_line(tmp_path, capsys):
    spec = write_spec(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "optuna.journal").write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run_main(["dashboard", spec, "--port", port], capsys)
    line = one_error_line(err)
    assert code == 2 and f"--port={port}: cannot listen on 127.0.0.1:{port}" in line, line
    assert "Listening" not in capsys.readouterr().out


# -- every subcommand under bad arguments ------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> list[list[str]]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    typo = write_spec(tmp_path, selction={"top_k": 2})
    return [[str(tmp_path / "missing.yaml")], [str(tmp_path / "folder")], [str(tmp_path / "broken.yaml")],
            [str(tmp_path / "list.yaml")], [str(typo)]]


SPEC_COMMANDS = ["launch", "worker", "simulate", "report", "status", "dashboard"]


@pytest.mark.parametrize("command", SPEC_COMMANDS)
def test_every_spec_command_refuses_bad_specs_in_one_line(tmp_path, capsys, command):
    for args in _bad_inputs(tmp_path):
        code, err = run_main([command, *args], capsys)
        assert code == 2, (command, args, err)
        one_error_line(err)


@pytest.mark.parametrize("argv", [
    ["launch", "{spec}", "--workers", "0"],
    ["launch", "{spec}", "--threads", "0"],
    ["launch", "{spec}", "--per-device", "2", "--devices", "cpu"],
    ["launch", "{spec}", "--devices", "0,0"],
    ["launch", "{spec}", "--storage", "mysql://x@y/z"],
    ["worker", "{spec}", "--workers", "0"],
    ["report", "{spec}"],  # never launched: no storage
    ["report", "{tmp}/under-plain.yaml", "--storage", "{tmp}/empty.journal"],
    ["report", "{spec}", "--storage", "{tmp}/folder"],
    ["dashboard", "{spec}"],
    ["dashboard", "{spec}", "--port", "70000"],
    ["status", "{spec}", "--storage", "mysql://x@y/z"],
    ["claims", "--out", "{tmp}/plain/claims"],
    ["train", "--task", "mlp-mnist1dd"],
    ["train", "--task", "mlp-mnist1d", "--set", "widht=3"],
    ["train", "--task", "mlp-mnist1d", "--epochs", "many"],
    ["launch"],
    ["nonsense"],
])
def test_bad_arguments_never_end_in_a_traceback(tmp_path, capsys, argv):
    spec = write_spec(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain").write_text("x")
    (tmp_path / "empty.journal").write_text("")
    (tmp_path / "under-plain.yaml").write_text(spec.read_text().replace(str(tmp_path / "out"), str(tmp_path / "plain" / "o")))
    argv = [a.format(spec=spec, tmp=tmp_path) for a in argv]
    code, err = run_main(argv, capsys)
    assert code == 2, (argv, err)
    assert "Traceback" not in err and err.strip(), err
    assert not (tmp_path / "out").exists() or argv[0] == "dashboard"


def test_claims_quick_keeps_off_the_committed_report(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("wdstudy.claims.run_claims",
                        lambda out, quick, log: seen.append((out, quick)) or [SimpleNamespace(key="k", verdict="holds")])
    assert main(["claims", "--quick"]) == 0
    assert seen.pop() == (Path("reports/claims-quick"), True)
    assert main(["claims"]) == 0
    assert seen.pop() == (Path("reports/claims"), False)
    assert main(["claims", "--quick", "--out", "elsewhere"]) == 0
    assert seen.pop() == (Path("elsewhere"), True)


# -- readable validation errors: every spec field -------------------------------------------


def _leaf_paths(model: type[BaseModel], prefix: tuple = ()) -> list[tuple]:
    """Every field of ``model`` as a key path into BASE's shape (lists at index 0)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann)
        inner = [a for a in (args or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if typing.get_origin(ann) is list and inner:
            out += _leaf_paths(inner[0], (*prefix, name, 0))
        elif inner and name != "weight_decay":
            if any(a is not type(None) and a not in inner for a in args):  # a number, or a mapping of its own
                out.append((*prefix, name))
            out += _leaf_paths(inner[0], (*prefix, name))
        elif name == "weight_decay" and prefix == ("search",):
            out += _leaf_paths(inner[0], (*prefix, name))  # one range for all
            out += _leaf_paths(inner[0], (*prefix, name, "l2"))  # one range per regularizer
        else:
            out.append((*prefix, name))
    return out


def _spec_with(path: tuple, value) -> dict:
    data = copy.deepcopy(BASE)
    data["tasks"] = [dict(data["tasks"][0])]
    data["optimizers"] = [{"name": "adam"}]
    if path[:3] == ("search", "weight_decay", "l2"):
        rng = {"low": 1e-6, "high": 1e-1}
        data["search"]["weight_decay"] = {"l2": dict(rng), "decoupled": dict(rng)}
    if path[:2] == ("evaluation", "seeds") and len(path) > 2:  # the rounds' shape of evaluation.seeds
        data["evaluation"]["seeds"] = {"min": 2, "max": 4, "step": 1}
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    return data


PATHS = _leaf_paths(StudySpec)


def test_the_field_walk_reaches_every_nested_model():
    names = {".".join(map(str, p)) for p in PATHS}
    for expected in ("name", "tasks.0.epochs", "tasks.0.precision", "optimizers.0.momentum", "search.lr.low",
                     "search.weight_decay.axis", "search.weight_decay.l2.high", "search.trials",
                     "evaluation.seeds", "evaluation.seeds.max", "decision.margin", "selection.top_k", "storage"):
        assert expected in names
    assert len(names) > 50


@pytest.mark.parametrize("path", PATHS, ids=lambda p: ".".join(map(str, p)))
def test_a_bad_value_in_any_field_is_one_line_naming_that_field(path):
    bad = [["not", "this"]]  # a value no field takes
    with pytest.raises(WdstudyError) as info:
        validate(StudySpec, _spec_with(path, bad), where="s.yaml")
    lines = str(info.value).splitlines()
    key = ".".join(map(str, path))
    naming = [ln for ln in lines if ln.startswith(f"s.yaml: {key}") or ln.startswith(f"s.yaml: {key.rsplit('.', 1)[0]}")]
    assert len(naming) == 1 and len(lines) == 1, lines
    assert "[" not in naming[0].split("=")[0] and "Field required" not in naming[0], naming  # no pydantic internals


@pytest.mark.parametrize("path,value,expected", [
    (("search", "weight_decay", "l2", "low"), -1e-5, "search.weight_decay.l2.low=-1e-05: must be > 0"),
    (("search", "weight_decay", "low"), 0, "search.weight_decay.low=0: must be > 0"),
    (("search", "lr", "high"), 1e-5, "search.lr: low (0.001) must be below high (1e-05)"),
    (("search", "trails"), 4, "search.trails=4: unknown key; did you mean trials?"),
    (("search", "weight_decay", "l2", "hihg"), 1.0, "search.weight_decay.l2.hihg=1.0: unknown key; did you mean high?"),
    (("search", "lr"), {"low": 1e-3, "hihg": 1.0}, "search.lr.hihg=1.0: unknown key; did you mean high?"),
    (("tasks", 0, "epoch"), 3, "tasks.0.epoch=3: unknown key; did you mean epochs?"),
    (("selction",), {"top_k": 2}, "selction: unknown key; did you mean selection?"),
    (("tasks", 0, "name"), "mlp-mnistld", "tasks.0.name='mlp-mnistld': unknown task 'mlp-mnistld'; did you mean mlp-mnist1d?"),
    (("regularizers",), ["none", "decouple"], "unknown regularizer 'decouple'; did you mean decoupled?"),
    (("search", "sampler"), "rnadom", "search.sampler='rnadom': choose one of 'tpe', 'random', 'grid'; did you mean random?"),
    (("evaluation", "seeds"), 0, "evaluation.seeds=0: must be at least 1"),
    (("evaluation", "seeds"), {"min": 2, "max": 4, "stpe": 1}, "evaluation.seeds.stpe=1: unknown key; did you mean step?"),
])
def test_messages_speak_the_specs_terms(path, value, expected):
    with pytest.raises(WdstudyError) as info:
        validate(StudySpec, _spec_with(path, value))
    lines = str(info.value).splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_a_spec_file_error_names_the_file(tmp_path):
    spec = write_spec(tmp_path, search={**BASE["search"], "trials": -1})
    with pytest.raises(WdstudyError, match=rf"^{spec}: search\.trials=-1: must be >= 1$"):
        load_spec(spec)


# -- the front door ----------------------------------------------------------------------------


@pytest.mark.integration
def test_version_is_the_installed_packages():
    r = subprocess.run([sys.executable, "-m", "wdstudy", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"wdstudy {importlib.metadata.version('wdstudy')}"


def test_top_level_help_says_what_the_tool_is_for(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "decoupled weight decay" in out and "L2 regularization" in out and "--version" in out
    assert "launch examples/my_study.yaml" in out


@pytest.mark.integration
def test_train_without_a_regularizer_names_what_ran(capsys):
    assert main(["train", "--task", "mlp-mnist1d", "--epochs", "1", "--set", "width=8"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("mlp-mnist1d · adam · none (λ=0,"), first
    assert main(["train", "--task", "mlp-mnist1d", "--epochs", "1", "--set", "width=8", "--weight-decay", "0.1"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("mlp-mnist1d · adam · decoupled (λ=0.1,")


@pytest.mark.integration
def test_status_names_a_database_without_its_password(tmp_path, capsys):
    """The test server trusts local connections, so a URL with a password opens it: the password must not show."""
    from .conftest import PG_URL

    user, rest = PG_URL.split("://", 1)[1].split("@", 1)
    with_password = f"postgresql://{user.split(':')[0]}:n0t-shown@{rest}"
    spec = write_spec(tmp_path, name="password-free-status")
    assert main(["status", str(spec), "--storage", with_password]) == 0
    out = capsys.readouterr().out
    assert "n0t-shown" not in out and f"postgresql://{user.split(':')[0]}:***@{rest}" in out, out
