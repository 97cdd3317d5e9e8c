"""The GPU path's surroundings, shown on a CPU (there is no GPU on these machines).

Slurm's variables and ``srun`` on the PATH, a GPU that allocates nothing, a driver too old for
the torch build, a device-side error, memory held by finished runs, per-epoch storage writes,
MIG listings of ``nvidia-smi -L``, TF32 and deterministic algorithms. Where the behaviour needs
CUDA, ``torch.cuda`` is monkeypatched (said at each such test); ``benchmarks/gpu_acceptance.sh``
checks the same points on a real GPU.
"""

from __future__ import annotations

import gc
import os
import signal
import textwrap
import weakref

import optuna
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Callback

import wdstudy.train as train_module
from wdstudy.analysis import trials_frame
from wdstudy.cells import Cells, cell_record
from wdstudy.launch import parse_nvidia_smi, plan_slots, why_cpu
from wdstudy.spec import load_spec
from wdstudy.storage import open_storage
from wdstudy.tasks import task_config
from wdstudy.train import DeviceUnavailable, check_accelerator, data_loss, gpu_numerics, make_trainer, train_run

from .conftest import assert_exact, cli, journal, setup_study, write_spec

SLURM_ENV = {"SLURM_JOB_ID": "41", "SLURM_JOB_NAME": "wdstudy-x", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "1",
             "SLURM_NNODES": "1", "SLURM_CPUS_ON_NODE": "2"}


L2 = {"low": 1e-5, "high": 1e-2}


def tiny(**over):
    return task_config("mlp-mnist1d", width=16, max_train=400, epochs=2, **over)


def fake_tool(tmp_path, name: str, body: str) -> str:
    """A fake command on a PATH of its own, prepended to the real PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


# -- 1. Slurm ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_worker_inside_a_slurm_job_with_srun_on_the_path_trains_as_on_a_laptop(tmp_path):
    """Before: SLURM_NTASKS=4 made Lightning raise 'You set --ntasks=4' in every trial, and srun on the
    PATH printed its warning for every run."""
    spec = write_spec(tmp_path, regularizers=["l2"], search={"weight_decay": L2, "trials": 2}, evaluation={"seeds": 1})
    env = {**os.environ, **SLURM_ENV, "PATH": fake_tool(tmp_path, "srun", "exit 0")}
    r = cli("worker", str(spec), "--single", env=env)
    assert r.returncode == 0, r.stderr
    assert "srun" not in r.stdout + r.stderr and "ntasks" not in r.stdout + r.stderr
    assert_exact(journal(tmp_path), "tiny", budget=2, seeds=1, cells=1)
    r = cli("train", "--task", "mlp-mnist1d", "--epochs", "1", "--set", "max_train=200", env=env)
    assert r.returncode == 0 and "srun" not in r.stderr, r.stderr


def test_the_trainer_has_one_process_and_no_slurm_requeue_handler(monkeypatch):
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    seen = {}

    class Look(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["usr1"] = signal.getsignal(signal.SIGUSR1)
            seen["env"] = trainer._accelerator_connector.cluster_environment
            seen["ranks"] = (trainer.world_size, trainer.global_rank, trainer.num_nodes)

    before = signal.getsignal(signal.SIGUSR1)
    trainer = make_trainer(1, [Look()], accelerator="cpu")
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer.fit(BoringModel())
    assert isinstance(seen["env"], LightningEnvironment)
    assert seen["usr1"] == before  # Lightning's SLURM auto-requeue (checkpoint + scontrol requeue) is not armed
    assert seen["ranks"] == (1, 0, 1)


# -- 2. and 3. a GPU that cannot run a kernel; a driver too old ---------------------------------------


def test_a_gpu_that_cannot_run_a_kernel_is_unavailable_not_a_failed_trial(monkeypatch):
    """torch.cuda.is_available() is faked True (an exclusive-process GPU held by another process
    answers True); the probe's allocation and synchronize fail, here for want of a driver, and
    synchronize is faked to raise too, so the check fails the same way on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def busy():
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(torch.cuda, "synchronize", busy)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DeviceUnavailable) as info:
        check_accelerator("gpu")
    msg = str(info.value)
    assert msg.startswith("accelerator='gpu': the CUDA device of this process (CUDA_VISIBLE_DEVICES='0') "
                          "cannot run a kernel (") and msg.endswith("refusing to train on the CPU instead")
    assert "\n" not in msg
    check_accelerator("cpu")  # no probe for a CPU run


@pytest.mark.parametrize("driver, told", [("550.54.15", True), ("580.65.06", False)])
def test_a_driver_too_old_for_the_torch_build_is_named_with_what_to_install(tmp_path, monkeypatch, driver, told):
    """torch.cuda.is_available() is faked False and nvidia-smi is a fake reporting the driver."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("PATH", fake_tool(tmp_path, "nvidia-smi", f"echo {driver}"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(DeviceUnavailable) as info:
        check_accelerator("gpu")
    msg = str(info.value)
    if told:
        assert (f"torch {torch.__version__} is built for CUDA 13.0, which needs NVIDIA driver >= 580, and this "
                f"machine's driver is {driver}: install driver >= 580 or a torch build for CUDA 12") in msg
    else:
        assert msg == ("accelerator='gpu': no usable CUDA device in this process; "
                       "refusing to train on the CPU instead")


# -- 2. a device-side error ends the worker, its trial is lost and re-queued ---------------------------


FAULTY = '''
from pathlib import Path

import torch
from torch import nn
from wdstudy.tasks.user import UserTask

MARK = Path(__file__).with_suffix(".failed")


class Faulty(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        if self.training and not MARK.exists():  # once: as a device-side assert surfaces, at a CUDA call
            MARK.touch()
            raise torch.AcceleratorError("CUDA error: device-side assert triggered")
        return self.lin(x)


def build():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.randint(0, 2, (60,), generator=g)
    return UserTask(Faulty(), (x[:40], y[:40]), (x[40:50], y[40:50]), (x[50:], y[50:]), num_workers=0)
'''


@pytest.mark.integration
def test_a_device_side_error_ends_its_worker_its_trial_lost_and_launch_starts_a_fresh_one(tmp_path):
    """The worker exits with DEVICE_FAULT after failing its trial as lost (no retry counted); its
    launch replaces it, as any death, and the study completes: a device fault stops no pool."""
    (tmp_path / "faulty.py").write_text(textwrap.dedent(FAULTY))
    spec = write_spec(tmp_path, tasks=[{"name": "faulty", "factory": f"{tmp_path / 'faulty.py'}:build",
                                        "epochs": 1, "batch_size": 20}],
                      regularizers=["l2"], search={"weight_decay": L2, "trials": 3}, evaluation={"seeds": 1})
    r = cli("launch", str(spec), "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "faulty.failed").exists()
    log = (tmp_path / "out" / "logs" / "worker-0.log").read_text()
    assert ("device error, exiting so a fresh process takes over: "
            "AcceleratorError: CUDA error: device-side assert triggered") in log
    storage = journal(tmp_path)
    df = trials_frame(storage, "tiny")
    failed = df[df.state == "FAIL"]
    assert len(failed) == 1 and failed.fail_kind.iloc[0] == "lost"  # lost: not counted against the retries
    assert_exact(storage, "tiny", budget=3, seeds=1, cells=1)


def test_the_pool_tells_each_exit_code_apart(tmp_path):
    """A device fault is a death (the slot restarts); an outage and a full disk stop the pool, and
    only a full disk stops the other workers with STORAGE_STOP (their trials failed as the disk's)."""
    from wdstudy.launch import DEVICE_FAULT, Pool
    from wdstudy.outage import STORAGE_FAULT, STORAGE_UNWRITABLE

    class Exited:
        pid = 999999

        def __init__(self, rc):
            self.rc = rc

        def poll(self):
            return self.rc

    spec, url = setup_study(tmp_path)
    log = tmp_path / "worker-0.log"
    log.write_text("wdstudy: the reason it gave\n")
    for rc, fault, unwritable in ((STORAGE_FAULT, "the reason it gave", False),
                                  (STORAGE_UNWRITABLE, "the reason it gave", True), (DEVICE_FAULT, None, False)):
        pool = Pool("spec.yaml", spec, url, [{}], tmp_path)
        pool.slots[0].proc, pool.slots[0].log = Exited(rc), log
        pool.reap(Cells(spec, open_storage(url)))
        assert (pool.fault, pool.unwritable) == (fault, unwritable), rc
        assert pool.slots[0].finished == (fault is not None) and (pool.slots[0].proc is None) == (fault is None)


# -- 4. memory of finished runs ------------------------------------------------------------------------


@pytest.mark.integration
def test_no_run_starts_while_an_earlier_run_still_holds_its_module_and_trainer(monkeypatch):
    """With automatic garbage collection off, whatever a run built (module, Trainer, the device copies
    of its splits) must be gone by the time the next run trains, after a run that diverged too:
    before, it lived in reference cycles until a full collection, after Lightning had emptied the
    CUDA cache, so K workers on one GPU ran out of memory."""
    refs, alive_at_start = [], []

    class Keep(Callback):
        def on_train_start(self, trainer, pl_module):
            alive_at_start.append(sum(m() is not None or t() is not None for m, t in refs))
            refs.append((weakref.ref(pl_module), weakref.ref(trainer)))

    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # faked: CUDA's cache is emptied after
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or real_collect(*a))
    gc.disable()
    try:
        with pytest.raises(train_module.DivergedError):
            train_run(tiny(), "sgd", "none", 1e6, 0.0, accelerator="cpu", callbacks=[Keep()])
        for seed in range(3):
            train_run(tiny(), "adam", "l2", 1e-3, 1e-4, seed=seed, accelerator="cpu", callbacks=[Keep()])
    finally:
        gc.enable()
    assert alive_at_start == [0, 0, 0, 0]  # nothing of an earlier run (the diverged one included) as a run starts
    # before and after each run: a full collection, then the cache emptied (Lightning empties it too, at
    # its teardown, before the cycles are collected: that one frees nothing)
    collects = [i for i, c in enumerate(calls) if c == "collect"]
    assert len(collects) == 8 and all(calls[i + 1] == "empty_cache" for i in collects)


def test_a_full_collection_skips_what_the_process_held_before_its_first_run():
    """The collection before and after every run must not walk torch's and Lightning's half-million
    objects each time (~0.2 s twice per run, a third of an MNIST-1D run): the first one freezes them,
    and what a run leaves in cycles is still collected."""
    train_run(tiny(), "adam", "l2", 1e-3, 1e-4, accelerator="cpu")
    assert gc.get_freeze_count() > 100_000  # torch and Lightning, imported before the first run

    class Cycle:
        pass

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    train_module.release_memory()
    assert gone() is None


# -- 5. per-epoch storage writes only for a pruner ------------------------------------------------------


@pytest.mark.parametrize("pruner", ["none", "median"])
@pytest.mark.integration
def test_per_epoch_values_reach_the_storage_live_only_for_a_pruner(tmp_path, monkeypatch, pruner):
    from wdstudy.cells import ensure_studies
    from wdstudy.worker import Worker

    spec = load_spec(write_spec(tmp_path, regularizers=["l2"], task_defaults={"epochs": 3},
                                search={"weight_decay": L2, "trials": 1, "pruner": pruner}, evaluation={"seeds": 1}))
    url = str((tmp_path / "out" / "optuna.journal").resolve())
    asked = []
    real = optuna.trial.Trial.should_prune
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: asked.append(1) or real(self))
    ensure_studies(spec, open_storage(url))
    Worker(spec, url, log=lambda m: None).run(max_units=1)
    t = [t for s in open_storage(url).get_all_studies() for t in optuna.load_study(
        study_name=s.study_name, storage=open_storage(url)).trials if t.state.is_finished()][0]
    assert len(asked) == (3 if pruner == "median" else 0)  # each one a storage round trip and replay
    history = t.user_attrs["history"]
    # the curve either way (the pruning callback reports Lightning's float32 metric)
    assert t.intermediate_values == pytest.approx({row["epoch"]: row["val_error"] for row in history}, rel=1e-6)
    assert len(t.intermediate_values) == 3


# -- 6. MIG and device order ---------------------------------------------------------------------------

SMI_PLAIN = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a1e0f6c-1111-2222-3333-444455556666)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-5a1e0f6c-1111-2222-3333-444455556667)
"""
SMI_MIG = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c98fe8c8)
  MIG 3g.20gb     Device  0: (UUID: MIG-1e7a7a1a-5bd6-5a39-9d40-7e5d1d8bfc3e)
  MIG 2g.10gb     Device  1: (UUID: MIG-9d2cfa2e-5b6c-5e0f-8e6a-9c59ad1bd3e7)
  MIG 1g.5gb      Device  2: (UUID: MIG-c4d86a5e-0b8d-5d2b-9c4d-1b1b0f1d7a44)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0c3f2b51-6a8e-3b8c-9b35-7e1f8d9b6a21)
"""


def test_nvidia_smi_listings_give_one_slot_per_device_cuda_can_see():
    assert parse_nvidia_smi(SMI_PLAIN) == ["0", "1"]
    # before: five lines, five slots, three of them for devices that do not exist
    assert parse_nvidia_smi(SMI_MIG) == ["MIG-1e7a7a1a-5bd6-5a39-9d40-7e5d1d8bfc3e",
                                         "MIG-9d2cfa2e-5b6c-5e0f-8e6a-9c59ad1bd3e7",
                                         "MIG-c4d86a5e-0b8d-5d2b-9c4d-1b1b0f1d7a44", "1"]
    assert parse_nvidia_smi("") == [] and parse_nvidia_smi("No devices were found\n") == []


def test_gpu_slots_follow_nvidia_smi_order_and_launch_says_why_it_planned_cpu_workers(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", fake_tool(tmp_path, "nvidia-smi", f"cat <<'EOF'\n{SMI_MIG}EOF"))
    slots = plan_slots("auto", None)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots][-1] == "1" and len(slots) == 4
    assert all(s["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" for s in slots)
    cpu = plan_slots("cpu", 2)
    assert why_cpu("auto", None, plan_slots("auto", None)) == ""  # GPUs were found
    assert why_cpu("cpu", None, cpu) == "" and why_cpu("auto", 2, cpu) == ""  # CPU workers were asked for
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi
    assert why_cpu("auto", None, plan_slots("auto", None)) == \
        " (CPU workers: no nvidia-smi on the PATH, so no GPU was looked for)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert why_cpu("auto", None, plan_slots("auto", None)) == " (CPU workers: CUDA_VISIBLE_DEVICES names no GPU)"


# -- 7. fp32 and determinism ----------------------------------------------------------------------------


def test_precision_32_on_a_gpu_is_full_fp32_and_deterministic_unless_the_task_says_otherwise(monkeypatch):
    """torch.cuda.is_available() is faked True: only the flags are set, nothing runs on a device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        assert gpu_numerics(tiny(), "auto") == {"deterministic": True}
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert gpu_numerics(tiny(tf32=True, deterministic=False), "gpu") == {"deterministic": False}
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert gpu_numerics(tiny(), "cpu") == {}
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


@pytest.mark.integration
def test_the_gpu_switches_are_spec_fields_that_leave_older_cell_records_unchanged(tmp_path):
    plain = load_spec(write_spec(tmp_path))
    switched = load_spec(write_spec(tmp_path, name="sw", task_defaults={"epochs": 2, "deterministic": False,
                                                                          "tf32": True}))
    rec = cell_record(plain, plain.cells()[0])
    assert "deterministic" not in rec.task and "tf32" not in rec.task
    rec = cell_record(switched, switched.cells()[0])
    assert rec.task["deterministic"] is False and rec.task["tf32"] is True
    bad = write_spec(tmp_path, name="bad", task_defaults={"tf32": "sometimes"})
    r = cli("launch", str(bad), "--dry-run")
    assert r.returncode == 2 and "tf32" in r.stderr and "Traceback" not in r.stderr


# -- 8. host syncs of 16-mixed: only the decays read what the scaler found --------------------------------


@pytest.mark.parametrize("name, reads", [("l2", False), ("l1", False), ("decoupled", True), ("l1-decoupled", True)])
@pytest.mark.integration
def test_under_16_mixed_only_the_weight_decays_read_found_inf(monkeypatch, name, reads):
    """Reading the scaler's found_inf synchronizes with the device. L2 and L1 change gradients,
    which a skipped step discards anyway, so they never read it; the decays read it each step.
    (16-mixed on the CPU: fp16 autocast with a CPU GradScaler, the same code path as CUDA's.)"""
    calls = []
    real = torch.amp.GradScaler._found_inf_per_device
    monkeypatch.setattr(torch.amp.GradScaler, "_found_inf_per_device",
                        lambda self, opt: calls.append(1) or real(self, opt))
    m = train_run(tiny(precision="16-mixed"), "adam", name, 1e-3, 1e-3, accelerator="cpu").metrics
    assert len(calls) == (m["steps"] if reads else 0)


# -- 8. regression targets are not cast to half precision ------------------------------------------------


def test_a_regression_loss_in_half_precision_is_computed_in_float():
    out = torch.tensor([1000.0, 2.0, -3.5]).half()
    y = torch.tensor([1000.3, 2.0001, -3.25])  # 1000.3 is not a half
    loss = data_loss(out, y, "mse")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(float(((out.double() - y.double()) ** 2).mean()), rel=1e-6)
