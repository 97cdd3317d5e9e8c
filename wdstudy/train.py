"""One training run: task + optimizer + regularizer callback -> ``Trainer.fit`` -> metrics.

The base optimizer is always built with ``weight_decay=0``: the regularizer callback
is the only source of regularization. Metrics are measured honestly:

* per epoch: validation loss and error (full pass, eval mode), the running average
  of the minibatch training loss (labelled as such), the learning rate, and the norm
  of the regularized weights;
* at the end: train loss and error from a full pass over the training split in eval
  mode, validation (and, if asked, test) loss and error, the generalization gaps,
  the L2 penalty (separately: all losses are the data loss alone) and wall time.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor, nn

from .config import validate
from .errors import WdstudyError, bad_value, check_number
from .regularizers import make_regularizer
from .spec import OPTIMIZERS, SCHEDULES, OptimizerConfig
from .tasks import ShuffledBatches, Split, TaskConfig, TaskData

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


class Classifier(LightningModule):
    """Cross-entropy classification of in-memory tensors with any backbone.

    Training batches are sliced from the training split on the training device;
    nothing is logged per step (only accumulated), and the optimizer is stepped by
    ``training_step`` itself (Lightning's manual optimization, which skips the
    automatic loop's closure machinery), so Lightning's per-step cost stays small
    next to tiny models. The regularizer callbacks still act in
    ``on_before_optimizer_step``, which Lightning calls inside ``optimizer.step()``;
    gradient clipping (``grad_clip``) follows them in this module's own hook, so L2
    is clipped as a loss term would be.
    """

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
        return ShuffledBatches(self.data.train.to(self.device), self.batch_size, seed=self.seed)

    def val_dataloader(self) -> ShuffledBatches:
        return ShuffledBatches(self.data.val.to(self.device), self.eval_batch_size, shuffle=False)

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
        loss = F.cross_entropy(logits, y)
        # summed once per epoch: no per-step synchronization
        self._losses.append(loss.detach())
        self._wrong.append((logits.detach().argmax(1) != y).sum())
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
        self._val[0] += F.cross_entropy(logits, y, reduction="sum")
        self._val[1] += (logits.argmax(1) != y).sum()
        self._val[2] += len(y)

    def on_validation_epoch_end(self) -> None:
        loss, err = (self._val[:2] / self._val[2]).tolist()
        if self.trainer.sanity_checking:
            return
        self.log("val_loss", loss)  # read by Optuna's pruning callback from trainer.callback_metrics
        self.log("val_error", err)
        self.history.append({"epoch": self.current_epoch, "val_loss": loss, "val_error": err})


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2000) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` on ``split``: one pass, eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = err_sum = 0.0
    try:
        for i in range(0, len(split), batch_size):
            x = split.x[i : i + batch_size].to(device)
            y = split.y[i : i + batch_size].to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits.double(), y, reduction="sum"))
            err_sum += float((logits.argmax(1) != y).sum())
    finally:
        model.train(was_training)
    return loss_sum / len(split), err_sum / len(split)


@dataclass
class RunResult:
    """What one training run measured: final ``metrics`` and per-epoch ``history``."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and the warnings irrelevant to in-memory data."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def make_trainer(max_epochs: int, callbacks: list[Callback], accelerator: str = "auto", **overrides: Any) -> Trainer:
    """A Trainer with everything a study run does not need turned off."""
    quiet_lightning()
    settings = dict(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    return Trainer(**{**settings, **overrides})


def train_run(
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
) -> RunResult:
    """Train ``task`` once and measure it; see the module docstring for the metrics.

    ``data`` may be passed to reuse splits already in memory (it must hold ``test``
    when ``with_test``). Raises :class:`DivergedError` if the training loss becomes
    NaN or infinite, and :class:`~wdstudy.errors.WdstudyError` for bad input.
    """
    if isinstance(optimizer, str):
        optimizer = optimizer_config(optimizer)
    if schedule not in SCHEDULES:
        raise bad_value("schedule", schedule, f"unknown; choose one of {', '.join(SCHEDULES)}")
    lr = check_number(lr, "lr", positive=True)
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise bad_value("seed", seed, "must be a whole number from 0 to 2**32 - 1")
    reg = make_regularizer(regularizer, weight_decay, decay_all=decay_all)
    if data is None:
        data = task.load_data(with_test=with_test)
    elif with_test and data.test is None:
        raise WdstudyError("with_test=True needs data that includes the test split")

    start = time.perf_counter()
    seed_everything(seed, workers=False, verbose=False)
    module = Classifier(
        task.build_model(),
        data,
        optimizer=optimizer,
        lr=lr,
        schedule=schedule,
        batch_size=task.batch_size,
        eval_batch_size=task.eval_batch_size,
        seed=seed,
        grad_clip=task.grad_clip,
    )
    try:
        trainer = make_trainer(task.epochs, [reg, *(callbacks or [])], accelerator=accelerator)
    except MisconfigurationException as exc:
        raise bad_value("accelerator", accelerator, str(exc).splitlines()[0]) from None
    trainer.fit(module)

    model = module.model
    m: dict[str, Any] = {}
    m["train_loss"], m["train_error"] = evaluate(model, data.train, task.eval_batch_size)
    m["val_loss"], m["val_error"] = evaluate(model, data.val, task.eval_batch_size)
    m["val_gap_loss"] = m["val_loss"] - m["train_loss"]
    m["val_gap_error"] = m["val_error"] - m["train_error"]
    if with_test:
        m["test_loss"], m["test_error"] = evaluate(model, data.test, task.eval_batch_size)
        m["gap_loss"] = m["test_loss"] - m["train_loss"]
        m["gap_error"] = m["test_error"] - m["train_error"]
    m["weight_norm"] = reg.weight_norm()
    m["l2_penalty"] = reg.penalty()
    m["zero_fraction"] = reg.zero_fraction()
    m["val_size"] = len(data.val)
    m["epochs"] = trainer.current_epoch
    m["steps"] = trainer.global_step
    m["wall_time_s"] = time.perf_counter() - start
    m["device"] = str(module.device)
    m["seed"] = seed

    by_epoch = {row["epoch"]: dict(row) for row in module.history}
    for row in reg.history:
        by_epoch.setdefault(row["epoch"], {"epoch": row["epoch"]}).update(row)
    return RunResult(m, [by_epoch[e] for e in sorted(by_epoch)])
