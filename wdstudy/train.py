"""One training run: task + optimizer + regularizer callback -> ``Trainer.fit`` -> metrics.

The base optimizer is always built with ``weight_decay=0``: the regularizer callback
is the only source of regularization. Metrics are measured honestly:

The "error" is the task's metric (:attr:`TaskConfig.metric <wdstudy.tasks.TaskConfig.metric>`):
the classification error rate, or — for a regression task such as ``linreg-curve1d``, trained
with a mean-squared-error loss — the MSE itself, stored under the same keys (``val_error``,
``test_error``, ``train_error``, ``gap_error``, ...) so a study searches, races and compares it
unchanged.

* per epoch: validation loss and error (full pass, eval mode), the running average
  of the minibatch training loss (labelled as such), the learning rate, and the norm
  of the regularized weights;
* at the end: train loss and error from a full pass over the training split in eval
  mode, validation (and, if asked, test) loss and error, the generalization gaps,
  the penalty of the L2 or L1 arm (separately: all losses are the data loss alone) and wall time.

Devices are honest: a run asked for the GPU accelerator trains on a GPU or raises
:class:`DeviceUnavailable` (never a silent fall-back to the CPU); the final
measurements run on the training device, before Lightning moves the model back to
the CPU at the end of ``fit``; and ``device`` records what really trained
(``cuda:0 NVIDIA H100 80GB HBM3`` or ``cpu``). ``precision`` is Lightning's (``32``,
``bf16-mixed``, ``16-mixed``); ``16-mixed`` on a CPU is real fp16 autocast with a
``torch.amp.GradScaler("cpu")`` rather than Lightning's silent switch to bf16.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from .config import validate
from .errors import WdstudyError, bad_value, check_number, one_line
from .mechanics import Mechanics
from .regularizers import make_regularizer
from .spec import SCHEDULES, OptimizerConfig
from .tasks import PRECISIONS, ShuffledBatches, TaskConfig, TaskData
from .tasks.data import batches
from .tasks.user import build_user_task, check_user_task, optimizer_problem

#: Accelerator names that promise a GPU (Lightning's spellings).
GPU_ACCELERATORS = ("gpu", "cuda")

def optimizer_config(name: str, **settings: Any) -> OptimizerConfig:
    """Build an :class:`OptimizerConfig`; bad input raises WdstudyError."""
    return validate(OptimizerConfig, {"name": name, **settings})


def build_optimizer(params, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """The base optimizer with ``weight_decay=0`` (regularization is the callback's job)."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=0.0)


def cosine_factor(step: int, total: int) -> float:
    """Cosine annealing from 1 to 0 over ``total`` steps (0 afterwards)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class DeviceUnavailable(WdstudyError):
    """A run was promised a GPU that this process cannot use.

    Raised instead of training on the CPU: a GPU study that silently ran on CPUs
    would report wrong compute and take days longer without anyone noticing. A
    worker that meets it fails its trial with this reason and takes no more work.
    """


class DeviceFault(RuntimeError):
    """A device-side error (``torch.AcceleratorError``: an illegal address, a device-side assert)
    left this process's CUDA context unusable: the worker fails its trial as lost and exits, so a
    fresh process takes over, rather than failing every later trial within a second."""


#: Oldest NVIDIA driver each CUDA major version of a torch build needs (NVIDIA's compatibility table).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def driver_version() -> str | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it, or None without one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def driver_problem() -> str | None:
    """Why this torch build cannot use this machine's driver, with what to install; None if it can
    (or nothing tells). torch 2.14's default wheel is built for CUDA 13 and needs driver >= 580."""
    built = torch.version.cuda
    driver = driver_version()
    if not built or not driver:
        return None
    major = int(built.split(".")[0])
    need = MIN_DRIVER.get(major)
    try:
        have = int(driver.split(".")[0])
    except ValueError:
        return None
    if need is None or have >= need:
        return None
    older = max((m for m, d in MIN_DRIVER.items() if d <= have), default=None)
    alternative = f" or a torch build for CUDA {older} (pip install torch --index-url " \
                  f"https://download.pytorch.org/whl/cu{older}x, with x the minor version offered)" if older else ""
    return (f"torch {torch.__version__} is built for CUDA {built}, which needs NVIDIA driver >= {need}, and this "
            f"machine's driver is {driver}: install driver >= {need}{alternative}")


def check_accelerator(accelerator: str) -> None:
    """Refuse a GPU accelerator when CUDA is not usable here, with the reason in one line.

    "Usable" means a kernel runs: an allocation on the device and a synchronization. That catches
    what ``torch.cuda.is_available()`` does not: an exclusive-process GPU another process holds, a
    device left faulted. A driver too old for this torch build is named with what to install.
    """
    if accelerator not in GPU_ACCELERATORS:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    pinned = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if not torch.cuda.is_available():
        why = driver_problem()
        raise DeviceUnavailable(
            f"accelerator={accelerator!r}: no usable CUDA device in this process{pinned}"
            + (f": {why}" if why else "") + "; refusing to train on the CPU instead"
        )
    try:
        probe = torch.ones(1, device="cuda")
        probe.add_(1)
        torch.cuda.synchronize()
        del probe
    except Exception as exc:  # busy (exclusive process), faulted, driver problem
        raise DeviceUnavailable(
            f"accelerator={accelerator!r}: the CUDA device of this process{pinned} cannot run a kernel "
            f"({one_line(exc, kind=False)}); refusing to train on the CPU instead"
        ) from None


def is_device_fault(exc: BaseException) -> bool:
    """A device-side error that poisons the process's CUDA context (not an out-of-memory, which
    is per trial): ``torch.AcceleratorError`` or a ``CUDA error`` other than out of memory."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "CUDA error" in text and "out of memory" not in text


def device_label(device: torch.device) -> str:
    """What a run trained on, as stored: ``cuda:0 NVIDIA H100 80GB HBM3`` or ``cpu``.

    The index is the one this process sees (its ``CUDA_VISIBLE_DEVICES`` entry is
    stored beside it); the name tells which hardware the wall time was spent on.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return device.type


def data_loss(out: Tensor, y: Tensor, metric: str = "error", reduction: str = "mean") -> Tensor:
    """The task's loss: cross-entropy of class logits, or the squared error of a regression (``mse``)."""
    if metric == "mse":  # in float32 at least: never the targets cast to half precision
        return F.mse_loss(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y.to(
            torch.promote_types(out.dtype, torch.float32)), reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


def error_sum(out: Tensor, y: Tensor, metric: str = "error") -> Tensor:
    """The task's error summed over a batch: misclassified examples, or squared errors (``mse``)."""
    if metric == "mse":
        return data_loss(out, y, metric, reduction="sum")
    return (out.argmax(1) != y).sum()


class SupervisedModule(LightningModule):
    """Supervised training on in-memory tensors with any backbone: cross-entropy classification
    by default.

    :attr:`metric` names the loss and error (:func:`data_loss`, :func:`error_sum`): ``error``,
    the classification error rate; :class:`Regressor` is the same module with a
    mean-squared-error loss (``mse``).

    Training batches are sliced from the training split on the training device;
    nothing is logged per step (only accumulated), and the optimizer is stepped by
    ``training_step`` itself (Lightning's manual optimization, which skips the
    automatic loop's closure machinery), so Lightning's per-step cost stays small
    next to tiny models. The regularizer callbacks still act in
    ``on_before_optimizer_step``, which Lightning calls inside ``optimizer.step()``;
    gradient clipping (``grad_clip``) follows them in this module's own hook, so L2
    is clipped as a loss term would be.
    """

    metric = "error"

    def __init__(
        self,
        model: nn.Module,
        data: TaskData,
        *,
        optimizer: OptimizerConfig,
        lr: float,
        schedule: str = "constant",
        batch_size: int = 128,
        eval_batch_size: int = 2000,
        seed: int = 0,
        grad_clip: float | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.grad_clip = grad_clip
        self.data = data
        self.optimizer_cfg = optimizer
        self.lr = lr
        self.schedule = schedule
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        #: One row per epoch: epoch, lr, val_loss, val_error, and train_loss_running /
        #: train_error_running (minibatch averages in train mode, as the epoch went).
        self.history: list[dict[str, Any]] = []
        self._losses: list[Tensor] = []
        self._wrong: list[Tensor] = []
        self._sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # -- data -------------------------------------------------------------------------

    def train_dataloader(self) -> ShuffledBatches:
        return batches(self.data.train, self.batch_size, shuffle=True, seed=self.seed, device=self.device,
                       num_workers=self.data.num_workers)

    def val_dataloader(self) -> ShuffledBatches:
        return batches(self.data.val, self.eval_batch_size, shuffle=False, device=self.device,
                       num_workers=self.data.num_workers)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # Batches are sliced from tensors that already live on the device.
        if batch[0].device == device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -- optimization -----------------------------------------------------------------

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer over all parameters, with ``weight_decay=0``."""
        return build_optimizer(self.parameters(), self.optimizer_cfg, self.lr)

    def configure_optimizers(self):
        opt = self.make_optimizer()
        if self.schedule == "constant":
            return opt
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        self._scheduler = self.lr_schedulers()

    def on_train_epoch_start(self) -> None:
        self._losses, self._wrong, self._sizes = [], [], []
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = data_loss(logits, y, self.metric)
        # summed once per epoch: no per-step synchronization
        self._losses.append(loss.detach())
        self._wrong.append(error_sum(logits.detach(), y, self.metric))
        self._sizes.append(len(y))
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(self.objective(loss))
        opt.step()  # -> callbacks' on_before_optimizer_step (regularizers), then ours (clipping)
        if self._scheduler is not None:
            self._scheduler.step()
        return loss

    def objective(self, loss: Tensor) -> Tensor:
        """What is differentiated: the data loss (override to add explicit terms)."""
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip)

    def on_train_epoch_end(self) -> None:
        sizes = torch.tensor(self._sizes, dtype=torch.float64, device=self.device)
        running = float(torch.stack(self._losses).double() @ sizes / sizes.sum())
        running_error = float(torch.stack(self._wrong).sum() / sizes.sum())
        row = self.history[-1] if self.history and self.history[-1]["epoch"] == self.current_epoch else None
        if row is None:
            row = {"epoch": self.current_epoch}
            self.history.append(row)
        row.update(lr=self._epoch_lr, train_loss_running=running, train_error_running=running_error)
        if not math.isfinite(running):
            raise DivergedError(f"training loss is {running} in epoch {self.current_epoch}")

    # -- validation ---------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self._val[0] += data_loss(logits, y, self.metric, reduction="sum")
        self._val[1] += error_sum(logits, y, self.metric)
        self._val[2] += len(y)

    def on_validation_epoch_end(self) -> None:
        loss, err = (self._val[:2] / self._val[2]).tolist()
        if self.trainer.sanity_checking:
            return
        self.log("val_loss", loss)  # read by Optuna's pruning callback from trainer.callback_metrics
        self.log("val_error", err)
        self.history.append({"epoch": self.current_epoch, "val_loss": loss, "val_error": err})


class Regressor(SupervisedModule):
    """Regression with a mean-squared-error loss: the model returns one number per example, and
    the "error" logged and measured (``val_error``, ``train_error_running``) is the MSE."""

    metric = "mse"


def per_example_error(out: Tensor, y: Tensor, metric: str = "error") -> Tensor:
    """Each example's error: 1 if misclassified (else 0), or its squared error summed over outputs."""
    if metric == "mse":
        return ((out - y.to(out.dtype)) ** 2).reshape(len(out), -1).sum(1)
    return (out.argmax(1) != y).to(torch.float64)


@torch.inference_mode()
def evaluate(model: nn.Module, split, batch_size: int = 2000, num_workers: int = 0,
             metric: str = "error", keep: list | None = None) -> tuple[float, float]:
    """Mean loss and error of ``model`` on ``split``: one pass, eval mode, summed in float64.

    Cross-entropy and error rate (``metric="error"``; ``model(x)`` gives logits), or, for a
    regression (``metric="mse"``), the mean squared error twice. ``split`` is a
    :class:`~wdstudy.tasks.data.Split` or a Dataset of ``(x, y)`` examples (read through a
    ``DataLoader`` with ``num_workers`` workers). With ``keep``, each example's error
    (:func:`per_example_error`) is appended to it, in the split's order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = err_sum = 0.0
    try:
        for x, y in batches(split, batch_size, shuffle=False, num_workers=num_workers):
            x, y = x.to(device), y.to(device)
            logits = model(x).double()
            loss_sum += float(data_loss(logits, y, metric, reduction="sum"))
            err_sum += float(error_sum(logits, y, metric))
            if keep is not None:
                keep.extend(per_example_error(logits, y, metric).cpu().tolist())
    finally:
        model.train(was_training)
    return loss_sum / len(split), err_sum / len(split)


class FinalMeasurement(Callback):
    """Measures the trained model on the device it trained on, and records that device.

    Lightning's teardown at the end of ``fit`` moves the model back to the CPU, so
    measuring after ``fit`` would run on the CPU and report it as the device. This
    callback measures in ``on_train_end``, before teardown. ``on_device`` (if given)
    hears the device label as training starts, so runs that end early (pruned,
    diverged) still tell where their time went.
    """

    def __init__(self, data: TaskData, batch_size: int, with_test: bool, on_device=None, metric: str = "error"):
        self.data = data
        self.metric = metric
        self.batch_size = batch_size
        self.with_test = with_test
        self.on_device = on_device
        self.device: str | None = None
        self.metrics: dict[str, float] = {}
        self.test_outcomes: list[float] | None = None  # each test example's error (with_test only)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.device = device_label(pl_module.device)
        if self.on_device is not None:
            self.on_device(self.device)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the module itself, not its backbone: a brought LightningModule's forward gives the logits
        model, m, workers = pl_module, self.metrics, self.data.num_workers
        self.device = device_label(next(model.parameters()).device)
        for split in ("train", "val", "test") if self.with_test else ("train", "val"):
            keep: list[float] | None = [] if split == "test" else None
            m[f"{split}_loss"], m[f"{split}_error"] = evaluate(model, getattr(self.data, split), self.batch_size,
                                                                workers, self.metric, keep=keep)
            if keep is not None:
                self.test_outcomes = keep


class BroughtModule(Callback):
    """What wdstudy adds around a user's own LightningModule (the protocol of :mod:`wdstudy.tasks.user`).

    At the start of training it checks that the module built the cell's base optimizer at the
    study's learning rate (the regularizer callback refuses a non-zero ``weight_decay`` itself):
    a module that quietly used another optimizer or learning rate would make the cell's label
    and the search's ``lr`` a lie. Per epoch it keeps the history the built-in module keeps —
    the learning rate, the running training loss of the batches, and the ``val_loss`` /
    ``val_error`` the module logged — and raises :class:`DivergedError` when the training
    loss became NaN or infinite.
    """

    def __init__(self, optimizer: str, lr: float):
        self.optimizer = optimizer
        self.lr = lr
        self.history: list[dict[str, Any]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            raise WdstudyError("the LightningModule configured no optimizer")
        for opt in trainer.optimizers:
            problem = optimizer_problem(opt, self.optimizer, self.lr)
            if problem:
                raise WdstudyError(problem)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        self._n = 0
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):  # summed on the device: no synchronization per step
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._sum += loss.detach().double() * scale
            self._n += 1

    def _row(self, epoch: int) -> dict[str, Any]:
        if not self.history or self.history[-1]["epoch"] != epoch:
            self.history.append({"epoch": epoch})
        return self.history[-1]

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = self._row(trainer.current_epoch)
        for key in ("val_loss", "val_error"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                row[key] = float(value)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        running = float(self._sum) / self._n if self._n else None
        self._row(trainer.current_epoch).update(lr=self._lr, train_loss_running=running)
        if running is not None and not math.isfinite(running):
            raise DivergedError(f"training loss is {running} in epoch {trainer.current_epoch}")


@dataclass
class RunResult:
    """What one training run measured: final ``metrics``, per-epoch ``history`` and its
    ``mechanics`` (per layer and checkpoint, column-wise: :attr:`wdstudy.mechanics.Mechanics.table`)."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    test_outcomes: list[float] | None = None  # each test example's error, in the split's order
    mechanics: dict[str, list] | None = None


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and the warnings irrelevant to in-memory data."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    # a run is one process on one device, also where srun exists (a Slurm login or compute node)
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")


def precision_settings(precision: str, accelerator: str) -> dict[str, Any]:
    """Trainer arguments for ``precision`` on ``accelerator``.

    Lightning turns ``16-mixed`` on a CPU into bf16 with only a warning; here it stays
    what it says, fp16 autocast with a CPU ``GradScaler`` (so skipped steps happen and
    the regularizers' skip logic is exercised), through an explicit plugin.
    """
    if precision not in PRECISIONS:
        raise bad_value("precision", precision, f"choose one of {', '.join(PRECISIONS)}")
    if precision == "32":
        return {}  # Lightning's default; leaves room for a precision plugin passed as an override
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision == "16-mixed" and on_cpu:
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


def make_trainer(
    max_epochs: int, callbacks: list[Callback], accelerator: str = "auto", precision: str = "32", **overrides: Any
) -> Trainer:
    """A Trainer with everything a study run does not need turned off, on exactly one device."""
    quiet_lightning()
    check_accelerator(accelerator)
    precision_kw = precision_settings(precision, accelerator)
    # one process on one device, also inside a Slurm job: no SLURM detection (which reads the job's
    # ranks and world size, warns about srun, and requeues the job on SIGUSR1), as on a laptop
    plugins = [LightningEnvironment(), *precision_kw.pop("plugins", []), *overrides.pop("plugins", [])]
    settings = dict(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        plugins=plugins,
        **precision_kw,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    return Trainer(**{**settings, **overrides})


_frozen = False


def release_memory() -> None:
    """Free what a finished run held: a full collection first (the Trainer, the module and the
    device copies of the splits live in reference cycles), then CUDA's cached blocks, so K workers
    sharing a GPU (``--per-device K``) do not run out of memory run after run.

    The first call also freezes what the process holds before its first run (torch, Lightning and
    their ~500,000 objects, which live as long as the process): the collector then skips them, and a
    full collection takes microseconds instead of ~0.2 s — twice per run, a third of a short run's time.
    """
    import gc

    global _frozen
    gc.collect()
    if not _frozen:
        gc.freeze()
        _frozen = True
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def on_gpu(accelerator: str) -> bool:
    return accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())


def gpu_numerics(task: TaskConfig, accelerator: str) -> dict[str, Any]:
    """Numerics of a GPU run, set before it trains; the Trainer arguments that go with them.

    ``precision: 32`` means full fp32: TF32 matrix products and convolutions (cuDNN's default)
    stay off unless the task sets ``tf32: true``. ``deterministic`` (default true) makes cuDNN
    and cuBLAS use deterministic algorithms, so a study re-run on the same GPU model gives the
    same runs; ``deterministic: false`` trades that for speed. On the CPU nothing changes.
    """
    if not on_gpu(accelerator):
        return {}
    tf32 = bool(task.tf32)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return {"deterministic": bool(task.deterministic)}


def train_run(*args: Any, **kwargs: Any) -> RunResult:
    """Train ``task`` once and measure it (:func:`_train_run` has the arguments); what a run held
    is released when it returns (:func:`release_memory`), and, for a run that raised (pruned,
    diverged: its exception keeps it alive while it is handled), before the next run starts.

    Example: two epochs of the linear regression on ``curve1d`` (50 training points in batches
    of 10) with SGD and decoupled weight decay, at a constant learning rate::

        >>> from wdstudy.tasks import task_config
        >>> from wdstudy.train import train_run
        >>> task = task_config("linreg-curve1d", epochs=2)
        >>> run = train_run(task, "sgd", "decoupled", lr=0.0625, weight_decay=0.5, schedule="constant",
        ...                 accelerator="cpu")
        >>> run.metrics["steps"], run.metrics["epochs"], len(run.history)
        (10, 2, 2)
        >>> run.metrics["integrated_shrink"]  # the sum of lr * weight_decay over the 10 steps
        0.3125
        >>> run.metrics["val_loss"] > 0 and run.metrics["weight_norm"] > 0
        True
    """
    import traceback

    release_memory()
    try:
        result, error = _train_run(*args, **kwargs), None
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the frames' locals hold the Trainer and the module
        result, error = None, exc
    release_memory()  # outside the except block: while an exception is being handled, it holds them too
    if error is not None:
        raise error
    return result


def _train_run(
    task: TaskConfig,
    optimizer: OptimizerConfig | str,
    regularizer: str,
    lr: float,
    weight_decay: float,
    *,
    seed: int = 0,
    schedule: str = "cosine",
    decay_all: bool = False,
    with_test: bool = False,
    callbacks: list[Callback] | None = None,
    accelerator: str = "auto",
    data: TaskData | None = None,
    on_device=None,
    mechanics: bool = True,
) -> RunResult:
    """Train ``task`` once and measure it; see the module docstring for the metrics.

    ``data`` may be passed to reuse splits already in memory (it must hold ``test``
    when ``with_test``). ``on_device(label)`` is called once training starts, with
    the device it runs on. ``mechanics`` records the run's timescale, per-layer norms and angular
    updates (:mod:`wdstudy.mechanics`) into ``metrics`` and ``RunResult.mechanics``. Raises
    :class:`DivergedError` if the training loss becomes NaN or infinite, :class:`DeviceUnavailable`
    if ``accelerator`` asks for a GPU this process cannot use, and :class:`~wdstudy.errors.WdstudyError` for bad input.
    """
    if isinstance(optimizer, str):
        optimizer = optimizer_config(optimizer)
    if schedule not in SCHEDULES:
        raise bad_value("schedule", schedule, f"unknown; choose one of {', '.join(SCHEDULES)}")
    lr = check_number(lr, "lr", positive=True)
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise bad_value("seed", seed, "must be a whole number from 0 to 2**32 - 1")
    reg = make_regularizer(regularizer, weight_decay, decay_all=decay_all)
    if task.is_user:
        start = time.perf_counter()
        seed_everything(seed, workers=False, verbose=False)  # the factory builds the model under the run's seed
        user = build_user_task(task.factory, task.options, lr=lr, schedule=schedule)
        check_user_task(task, user)
        data = TaskData(user.train, user.val, user.test, user.num_workers)
        model = user.model
    else:
        if data is None:
            data = task.load_data(with_test=with_test)
        elif with_test and data.test is None:
            raise WdstudyError("with_test=True needs data that includes the test split")
        start = time.perf_counter()
        seed_everything(seed, workers=False, verbose=False)
        model = task.build_model()

    brought = isinstance(model, LightningModule)  # a user's whole LightningModule (wdstudy.tasks.user)
    if brought:
        module, watch = model, BroughtModule(optimizer.name, lr)
        extra: dict[str, Any] = {"accumulate_grad_batches": task.accumulate_grad_batches}
        if task.grad_clip:
            extra.update(gradient_clip_val=task.grad_clip, gradient_clip_algorithm="norm")
    else:
        module = (Regressor if task.metric.key == "mse" else SupervisedModule)(
            model,
            data,
            optimizer=optimizer,
            lr=lr,
            schedule=schedule,
            batch_size=task.batch_size,
            eval_batch_size=task.eval_batch_size,
            seed=seed,
            grad_clip=task.grad_clip,
        )
        watch, extra = None, {}
    final = FinalMeasurement(data, task.eval_batch_size, with_test, on_device, task.metric.key)
    mech = Mechanics(regularizer, weight_decay, decay_all) if mechanics else None
    own = [reg, *(callbacks or []), final] + ([watch] if watch is not None else []) + ([mech] if mech else [])
    extra.update(gpu_numerics(task, accelerator))
    try:
        trainer = make_trainer(task.epochs, own, accelerator=accelerator, precision=task.precision, **extra)
    except MisconfigurationException as exc:
        raise bad_value("accelerator", accelerator, str(exc).splitlines()[0]) from None
    if brought:
        device = trainer.strategy.root_device
        trainer.fit(
            module,
            train_dataloaders=batches(data.train, task.batch_size, shuffle=True, seed=seed, device=device,
                                      num_workers=data.num_workers),
            val_dataloaders=batches(data.val, task.eval_batch_size, shuffle=False, device=device,
                                    num_workers=data.num_workers),
        )
    else:
        trainer.fit(module)
    if not final.metrics:  # fit returned without reaching on_train_end (Lightning swallowed a stop)
        raise RuntimeError(f"training stopped in epoch {trainer.current_epoch} before its final measurement")

    m: dict[str, Any] = dict(final.metrics)
    m["val_gap_loss"] = m["val_loss"] - m["train_loss"]
    m["val_gap_error"] = m["val_error"] - m["train_error"]
    if with_test:
        m["gap_loss"] = m["test_loss"] - m["train_loss"]
        m["gap_error"] = m["test_error"] - m["train_error"]
    squared = reg.squared_norm()
    m["weight_norm"] = math.sqrt(squared)
    m["penalty"] = reg.penalty(squared)
    m["zero_fraction"] = reg.zero_fraction()
    m["val_size"] = len(data.val)
    m["epochs"] = trainer.current_epoch
    m["steps"] = trainer.global_step
    m["wall_time_s"] = time.perf_counter() - start
    m["device"] = final.device
    m["precision"] = task.precision
    m["seed"] = seed
    if mech is not None:
        m.update(mech.summary())

    by_epoch = {row["epoch"]: dict(row) for row in (watch.history if brought else module.history)}
    for row in reg.history:
        by_epoch.setdefault(row["epoch"], {"epoch": row["epoch"]}).update(row)
    return RunResult(m, [by_epoch[e] for e in sorted(by_epoch)], final.test_outcomes,
                     mech.table if mech is not None else None)
