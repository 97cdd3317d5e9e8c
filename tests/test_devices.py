"""Devices and precision: honest GPU slots, packed GPUs, where a run measured, mixed precision.

The CPU tests run everywhere. A GPU slot is made unusable on any machine by pinning it to a
device id that does not exist, so "fails instead of training on the CPU" is tested even
where CUDA is present. The tests marked ``gpu`` need CUDA and are the only tests that skip.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy

import wdstudy.train as train_module
from wdstudy.analysis import compute_hours, evaluations_frame, trials_frame
from wdstudy.cli import main
from wdstudy.launch import plan_slots
from wdstudy.spec import load_spec
from wdstudy.tasks import task_config
from wdstudy.train import DeviceUnavailable, train_run

from .conftest import cli, journal, write_spec

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Device ids no machine has: CUDA sees no device in a process pinned to them.
MISSING_GPUS = "GPU-00000000-0000-0000-0000-00000000dead,GPU-00000000-0000-0000-0000-00000000beef"


def tiny(**over):
    return task_config("mlp-mnist1d", width=16, max_train=400, epochs=2, **over)


# -- honest devices ------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_gpu_slot_without_its_gpu_fails_its_trial_and_trains_nothing_on_the_cpu(tmp_path):
    """launch plans one GPU worker per device the job was given; neither exists, so each worker
    fails the trial it took with the reason, exits, and is not restarted; launch exits 1."""
    spec = write_spec(tmp_path, search={"trials": 4})
    r = cli("launch", str(spec), "--quiet", env={**os.environ, "CUDA_VISIBLE_DEVICES": MISSING_GPUS})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    for i, dev in enumerate(MISSING_GPUS.split(",")):
        assert f"wdstudy: worker {i} cannot use its device (CUDA_VISIBLE_DEVICES={dev})" in r.stderr, r.stderr
    assert r.stderr.count("refusing to train on the CPU instead; giving it up") == 2, r.stderr
    df = pd.concat([trials_frame(journal(tmp_path), "tiny"), evaluations_frame(journal(tmp_path), "tiny")])
    ran = df[df.worker.notna()]
    assert (ran.state == "FAIL").all() and len(ran) == 2, ran  # one trial per worker, then it stopped
    assert sorted(ran.cuda_visible_devices) == sorted(MISSING_GPUS.split(","))
    assert ran.reason.str.fullmatch(
        r"DeviceUnavailable: accelerator='gpu': no usable CUDA device in this process "
        r"\(CUDA_VISIBLE_DEVICES='GPU-[0-9a-f-]+'\); refusing to train on the CPU instead").all(), ran.reason
    assert ran.device.isna().all() and ran.wall_time_s.isna().all()  # nothing trained anywhere
    assert (df[df.state == "WAITING"].worker.isna()).all() and (df.state == "WAITING").any()  # re-queued


@pytest.mark.integration
def test_the_gpu_accelerator_is_refused_rather_than_replaced(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(DeviceUnavailable, match=r"accelerator='cuda': .*CUDA_VISIBLE_DEVICES='3'.*refusing"):
        train_run(tiny(), "adam", "l2", 1e-3, 1e-4, accelerator="cuda")
    assert main(["train", "--task", "mlp-mnist1d", "--epochs", "1", "--accelerator", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wdstudy: error: accelerator='gpu': no usable CUDA device") and "\n" not in err


@pytest.mark.integration
def test_the_final_measurement_runs_before_lightning_moves_the_model_to_the_cpu(monkeypatch):
    """Lightning's teardown at the end of fit moves the model to the CPU; measuring after it
    would measure (and record) the CPU on a GPU run. Every final pass must come before it."""
    events = []
    real_teardown, real_evaluate = SingleDeviceStrategy.teardown, train_module.evaluate

    def teardown(self):
        events.append("teardown")
        return real_teardown(self)

    def evaluate(*args, **kwargs):
        events.append("evaluate")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(SingleDeviceStrategy, "teardown", teardown)
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    seen = []
    r = train_run(tiny(), "adam", "decoupled", 3e-3, 0.1, with_test=True, accelerator="cpu", on_device=seen.append)
    assert events == ["evaluate"] * 3 + ["teardown"], events  # train, val, test passes, then teardown
    assert r.metrics["device"] == "cpu" and seen == ["cpu"]


@pytest.mark.integration
def test_every_run_records_the_device_it_trained_on_and_compute_is_summed_by_kind(tmp_path):
    spec = write_spec(tmp_path, search={"trials": 2}, evaluation={"seeds": 1})
    r = cli("launch", str(spec), "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    trials, evals = trials_frame(journal(tmp_path), "tiny"), evaluations_frame(journal(tmp_path), "tiny")
    assert (trials.device == "cpu").all() and (evals.device == "cpu").all()
    assert (trials.precision == "32").all()
    hours = compute_hours(trials, evals)
    assert hours["gpu_hours"] == 0
    assert hours["cpu_hours"] == pytest.approx((trials.wall_time_s.sum() + evals.wall_time_s.sum()) / 3600)
    assert f"compute: 0.000 GPU-hours, {hours['cpu_hours']:.3f} CPU-hours" in r.stdout


def test_compute_hours_split_gpu_from_cpu_and_count_runs_that_ended_early():
    t0 = pd.Timestamp("2026-01-01 00:00:00")
    trials = pd.DataFrame([
        {"device": "cuda:0 NVIDIA H100 80GB HBM3", "wall_time_s": 1800.0, "start": t0, "end": t0},
        {"device": "cuda:1 NVIDIA H100 80GB HBM3", "wall_time_s": None,  # pruned: start to end
         "start": t0, "end": t0 + pd.Timedelta(minutes=90)},
        {"device": "cpu", "wall_time_s": 7200.0, "start": t0, "end": t0},
        {"device": None, "wall_time_s": None, "start": t0, "end": t0 + pd.Timedelta(hours=5)},  # never trained
    ])
    evals = pd.DataFrame([{"device": "cpu", "wall_time_s": 3600.0, "start": t0, "end": t0}])
    assert compute_hours(trials, evals) == {"gpu_hours": pytest.approx(2.0), "cpu_hours": pytest.approx(3.0)}
    assert compute_hours(pd.DataFrame(), pd.DataFrame()) == {"gpu_hours": 0.0, "cpu_hours": 0.0}


# -- several workers per GPU -----------------------------------------------------------------------


def test_per_device_packs_k_workers_on_each_gpu_with_the_gpu_accelerator(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    slots = plan_slots("auto", None, None, per_device=3)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["2", "2", "2", "3", "3", "3"]
    assert {s["WDSTUDY_ACCELERATOR"] for s in slots} == {"gpu"}
    assert {s["WDSTUDY_THREADS"] for s in slots} == {str(max(1, (os.cpu_count() or 1) // 6))}
    assert [s["CUDA_VISIBLE_DEVICES"] for s in plan_slots("1", None, 2, per_device=2)] == ["3", "3"]
    assert len(plan_slots("auto", None)) == 2  # one per GPU by default


@pytest.mark.integration
def test_dry_run_shows_the_packed_slots(tmp_path):
    spec = write_spec(tmp_path)
    r = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(spec), "--per-device", "2", "--threads", "1",
                        "--dry-run"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "slot 0: CUDA_VISIBLE_DEVICES=GPU-aaaa threads=1 accelerator=gpu",
        "slot 1: CUDA_VISIBLE_DEVICES=GPU-aaaa threads=1 accelerator=gpu",
        "slot 2: CUDA_VISIBLE_DEVICES=GPU-bbbb threads=1 accelerator=gpu",
        "slot 3: CUDA_VISIBLE_DEVICES=GPU-bbbb threads=1 accelerator=gpu",
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env,args,needle", [
    ({"CUDA_VISIBLE_DEVICES": "0"}, ["--per-device", "0"], "--per-device=0: must be >= 1 (workers per GPU)"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, ["--per-device=-2"], "--per-device=-2: must be >= 1"),
    ({"CUDA_VISIBLE_DEVICES": ""}, ["--per-device", "2"], "--per-device=2: applies to GPU workers only, and no GPU is visible"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, ["--per-device", "2", "--devices", "cpu"], "and --devices=cpu plans CPU workers"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, ["--per-device", "2", "--workers", "2"], "and --workers asks for CPU workers"),
])
@pytest.mark.integration
def test_bad_per_device_is_one_line_exit_2(tmp_path, env, args, needle):
    spec = write_spec(tmp_path)
    r = subprocess.run([sys.executable, "-m", "wdstudy", "launch", str(spec), *args, "--dry-run"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("wdstudy: error: ") and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


# -- mixed precision -------------------------------------------------------------------------------


class AutocastProbe(Callback):
    """Records the dtype the model's first layer computes in during training steps, and the scaler."""

    def __init__(self):
        self.dtypes, self.scalers = set(), set()

    def on_train_start(self, trainer, pl_module):
        first = next(m for m in pl_module.model.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype) if m.training else None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.scalers.add(type(getattr(trainer.precision_plugin, "scaler", None)).__name__)


@pytest.mark.parametrize("precision,dtype,scaler", [
    ("32", torch.float32, "NoneType"),
    ("bf16-mixed", torch.bfloat16, "NoneType"),
    ("16-mixed", torch.float16, "GradScaler"),  # really fp16 on the CPU, not Lightning's silent bf16
])
@pytest.mark.integration
def test_a_tiny_run_trains_in_the_precision_asked_for_and_stores_it(precision, dtype, scaler):
    probe = AutocastProbe()
    r = train_run(tiny(precision=precision), "adam", "decoupled", 3e-3, 0.1, accelerator="cpu", callbacks=[probe])
    assert probe.dtypes == {dtype} and probe.scalers == {scaler}
    assert r.metrics["precision"] == precision and r.metrics["device"] == "cpu"
    assert r.metrics["steps"] == 2 * 4 and 0 < r.metrics["train_loss"] < 2.4  # 400 examples, batches of 128


def test_precision_in_a_spec_reaches_every_run_and_bad_values_name_field_file_and_value(tmp_path, capsys):
    spec = load_spec(write_spec(tmp_path, task_defaults={"epochs": 2, "precision": "bf16-mixed"}))
    assert {c.task.precision for c in spec.cells()} == {"bf16-mixed"}
    assert load_spec(write_spec(tmp_path, task_defaults={"epochs": 2, "precision": 32})).tasks[0].precision == "32"
    bad = write_spec(tmp_path, tasks=[{"name": "mlp-mnist1d", "precision": "fp8"}])
    assert main(["launch", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wdstudy: error: {bad}: tasks.0.precision='fp8': choose one of 32, bf16-mixed, 16-mixed", err


@pytest.mark.integration
def test_train_precision_option(capsys):
    assert main(["train", "--task", "mlp-mnist1d", "--epochs", "1", "--set", "max_train=300", "--accelerator", "cpu",
                 "--precision", "bf16-mixed"]) == 0
    assert "cpu, precision bf16-mixed)" in capsys.readouterr().out
    assert main(["train", "--task", "mlp-mnist1d", "--epochs", "1", "--precision", "16"]) == 2
    assert "precision='16': choose one of 32, bf16-mixed, 16-mixed" in capsys.readouterr().err


def test_a_default_precision_leaves_the_cell_record_of_older_studies_unchanged(tmp_path):
    from wdstudy.cells import cell_record

    spec = load_spec(write_spec(tmp_path))
    assert "precision" not in cell_record(spec, spec.cells()[0]).task  # studies started before still resume
    mixed = load_spec(write_spec(tmp_path, task_defaults={"epochs": 2, "precision": "16-mixed"}))
    assert cell_record(mixed, mixed.cells()[0]).task["precision"] == "16-mixed"


# -- on a CUDA machine only ------------------------------------------------------------------------


@gpu
def test_gpu_run_trains_and_measures_on_the_gpu_and_says_which():
    seen = []
    r = train_run(tiny(), "adam", "decoupled", 3e-3, 0.1, with_test=True, accelerator="gpu", on_device=seen.append)
    name = torch.cuda.get_device_name(0)
    assert r.metrics["device"] == f"cuda:0 {name}" and seen == [f"cuda:0 {name}"]


@gpu
def test_gpu_16_mixed_uses_fp16_autocast_and_a_cuda_grad_scaler():
    probe = AutocastProbe()
    r = train_run(tiny(precision="16-mixed"), "adam", "decoupled", 3e-3, 0.1, accelerator="gpu", callbacks=[probe])
    assert probe.dtypes == {torch.float16} and probe.scalers == {"GradScaler"}
    assert r.metrics["precision"] == "16-mixed" and r.metrics["device"].startswith("cuda:0 ")


@gpu
@pytest.mark.integration
def test_gpu_k_workers_per_device_share_it_and_record_it(tmp_path):
    spec = write_spec(tmp_path, search={"trials": 8}, evaluation={"seeds": 1})
    r = cli("launch", str(spec), "--devices", "0", "--per-device", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    df = pd.concat([trials_frame(journal(tmp_path), "tiny"), evaluations_frame(journal(tmp_path), "tiny")])
    done = df[df.state == "COMPLETE"]
    assert done.device.str.startswith("cuda:0 ").all(), done.device
    assert done.worker.nunique() == 2  # two workers, one device
    assert compute_hours(df)["cpu_hours"] == 0 and compute_hours(df)["gpu_hours"] > 0



# -- the throughput benchmark --------------------------------------------------------------------


@pytest.mark.integration
def test_gpu_throughput_benchmark_says_plainly_when_there_is_no_gpu_and_writes_valid_studies(tmp_path):
    from benchmarks.gpu_throughput import spec_for

    r = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--ks", "1,2"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": MISSING_GPUS})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gpu_throughput: no CUDA device is usable here") and "nothing was measured" in r.stdout
    for k in (1, 16):
        path = tmp_path / f"k{k}.yaml"
        path.write_text(yaml.safe_dump(spec_for(k, 4, 5, "16-mixed", tmp_path / "out")))
        spec = load_spec(path)
        assert spec.search.batch == k and spec.budget("decoupled") == 4 * k  # no worker waits for a generation
        assert {t.precision for t in spec.tasks} == {"16-mixed"} and {t.name for t in spec.tasks} == {
            "mlp-mnist1d", "cnn-mnist1d", "gru-mnist1d"}
