"""Why the arms differ: timescale, integrated shrink, per-layer norms, angular updates, rotational equilibrium.

Measured in every run by one Lightning callback, :class:`Mechanics`, that any task gets (built-in,
factory or a user's own LightningModule: it works through the trainer's hooks only). The
quantities and where they come from (``docs/explanation/mechanics.md`` explains how to read them):

* **Timescale** (Wang & Aitchison, ICML 2025). Decoupled decay makes the weights an exponential
  moving average of recent updates with timescale ``τ_iter = 1/(η·λ)`` steps (``1/λ`` for the
  ``independent`` convention, whose shrink is ``s_t·λ``), at the peak learning rate;
  ``τ_epoch = τ_iter / steps per epoch``. Their finding: the best ``τ_epoch`` stays roughly put as
  model and data grow, between about one epoch and the training length.
  :func:`timescale` and :func:`integrated_shrink` (``S = Σ_t η_t·λ``, or ``Σ_t s_t·λ``).
* **Rotational equilibrium** (Kosson et al., ICML 2024). For a weight whose loss is scale-invariant,
  decoupled decay and the optimizer's updates balance: the weight norm settles and each step
  rotates the weight by a predictable angle, :func:`equilibrium_angular_update`:
  ``√(2·d·(1−β₁)/(1+β₁))`` for AdamW with per-step shrink ``d = η_t·λ``; ``√(2·η·λ/(1+α))`` for SGD
  with momentum ``α`` and L2 (the decay then passes through the momentum); ``√(2·d·(1−α)/(1+α))``
  for SGD with momentum and decoupled decay (the same derivation, with the decay outside the
  momentum). Adam + L2 has none: its shrink of each weight is divided by that weight's
  ``√v̂ + ε``, so it depends on the gradients (its per-weight shrink ``η·λ/(√v̂+ε)`` is recorded
  instead, as median and 10th/90th percentiles).
* **Effective learning rate** (Zhang et al., ICLR 2019): for a scale-invariant weight, ``η/‖w‖²``.
  Which weights are scale-invariant: those :func:`scale_invariant_names` finds (a Linear or
  convolution followed directly by a batch norm, or without bias by a layer or group norm, inside
  an ``nn.Sequential``), plus any whose module or parameter carries ``scale_invariant = True``.

Cost: the callback keeps one copy of the regularized tensors (the weights after the previous
sampled step). It measures the per-step angle on about ``samples`` evenly spaced steps (200 by
default; at most one step in :data:`MIN_EVERY`) and the norms at ``checkpoints`` (10) evenly spaced
steps; it times
itself, and ``overhead`` is its own time over the rest of the run's, measured in the same run.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from .arms import WEIGHT_DECAYS
from .records import MECHANICS_KEYS
from .regularizers import NORM_LAYERS, split_parameters

#: arms whose shrink is a multiple of the weights, outside the optimizer (decoupled decay)
DECOUPLED = WEIGHT_DECAYS
#: the angle is measured on at most one step in this many (the cost of a measurement is a few
#: optimizer steps' worth of small operations on the regularized tensors)
MIN_EVERY = 8
#: the scalars a run stores (trial user attributes: the dashboard, ``load_results``, the exports)
SCALARS = MECHANICS_KEYS


# -- closed forms ---------------------------------------------------------------------------------


def per_step_shrink(regularizer: str, lr: float, weight_decay: float, lr0: float | None = None) -> float | None:
    """The factor a decoupled arm shrinks the weights by in one step at learning rate ``lr``:
    ``lr·λ`` (``decoupled``), ``(lr/lr0)·λ`` (``independent``); for ``l2`` the shrink plain SGD
    applies, ``lr·λ``; None for the other arms."""
    if regularizer == "independent":
        return (lr / (lr0 or lr)) * weight_decay
    if regularizer in ("decoupled", "l2"):
        return lr * weight_decay
    return None


def equilibrium_angular_update(optimizer: str, regularizer: str, lr: float, weight_decay: float, *,
                               lr0: float | None = None, beta1: float = 0.9, momentum: float = 0.0,
                               nesterov: bool = False) -> tuple[float | None, str]:
    """The predicted per-step angular update (radians) of a scale-invariant weight in rotational
    equilibrium, and the formula's name — or ``(None, why not)``.

    ``optimizer`` is ``adam`` or ``sgd``; ``lr`` the current learning rate η_t; ``lr0`` the initial
    one (for ``independent``). See the module docstring for the formulas (Kosson et al. 2024).
    """
    if weight_decay <= 0 or regularizer in ("none",):
        return None, "no decay: the norm grows and the angular update keeps falling"
    if regularizer not in (*DECOUPLED, "l2"):
        return None, f"{regularizer}: no rotational equilibrium (not a multiplicative decay)"
    if optimizer == "adam":
        if regularizer == "l2":
            return None, "Adam + L2: no fixed equilibrium (the shrink of each weight is divided by its √v̂+ε)"
        d = per_step_shrink(regularizer, lr, weight_decay, lr0)
        return math.sqrt(2 * d * (1 - beta1) / (1 + beta1)), "√(2·η·λ·(1−β₁)/(1+β₁))"
    if optimizer == "sgd":
        if nesterov and momentum:
            return None, "SGD with Nesterov momentum: no closed form here"
        if regularizer == "l2":
            return math.sqrt(2 * lr * weight_decay / (1 + momentum)), "√(2·η·λ/(1+α))"
        d = per_step_shrink(regularizer, lr, weight_decay, lr0)
        return math.sqrt(2 * d * (1 - momentum) / (1 + momentum)), "√(2·η·λ·(1−α)/(1+α))"
    return None, f"optimizer {optimizer}: no closed form here"


def equilibrium_norm(lr: float, weight_decay: float, numel: int, *, regularizer: str = "decoupled",
                     lr0: float | None = None) -> float | None:
    """The equilibrium norm of a scale-invariant weight of ``numel`` entries under Adam with decoupled
    decay, when its gradients are noise (each coordinate's update ``m̂/√v̂`` then carries a total
    impact of one step of size η): ``η·√(C/(2·d))`` with ``d`` the per-step shrink, which is
    ``√(η·C/(2λ))`` for ``decoupled``. None for the other arms."""
    d = per_step_shrink(regularizer, lr, weight_decay, lr0) if regularizer in DECOUPLED else None
    if not d:
        return None
    return lr * math.sqrt(numel / (2 * d))


def integrated_shrink(lrs, regularizer: str, weight_decay: float, lr0: float | None = None) -> float | None:
    """``S = Σ_t η_t·λ`` over the learning rates ``lrs`` of a run's steps (``decoupled``), or
    ``Σ_t (η_t/η_0)·λ`` (``independent``, η_0 = ``lr0`` or the first rate); None for other arms.
    ``exp(−S)`` is (to first order) what the decay alone leaves of the initial weights."""
    lrs = list(lrs)
    if regularizer == "decoupled":
        return weight_decay * math.fsum(lrs)
    if regularizer == "independent":
        base = lr0 if lr0 is not None else (lrs[0] if lrs else 1.0)
        return weight_decay * math.fsum(lrs) / base
    return None


def timescale(regularizer: str, lr: float, weight_decay: float, steps_per_epoch: float) -> dict[str, float | None]:
    """``tau_iter`` (steps) and ``tau_epoch`` (epochs) of a decoupled arm at peak learning rate ``lr``:
    ``1/(η·λ)`` (``decoupled``) or ``1/λ`` (``independent``); None for the other arms."""
    if regularizer not in DECOUPLED or weight_decay <= 0:
        return {"tau_iter": None, "tau_epoch": None}
    tau = 1.0 / (lr * weight_decay) if regularizer == "decoupled" else 1.0 / weight_decay
    return {"tau_iter": tau, "tau_epoch": tau / steps_per_epoch}


def _angle_from_norms(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The angle between vectors of norms ``a`` and ``b`` whose difference has norm ``d``: from
    ``d² = (a−b)² + 4ab·sin²(θ/2)``, exact, and stable for tiny angles: ``d`` is the norm of the
    difference itself, not a difference of nearly equal numbers."""
    s = ((d * d - (a - b) ** 2).clamp_min(0) / (4 * a * b)).sqrt()
    return 2 * torch.asin(s.clamp_max(1.0))


def angle(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The angle (radians) between ``a`` and ``b`` — flattened, or row by row along ``dim`` — computed
    as ``2·atan2(‖â − b̂‖, ‖â + b̂‖)``, accurate for the tiny angles of one step (``arccos`` of the
    cosine loses them in float32)."""
    if dim is None:
        a, b = a.reshape(-1), b.reshape(-1)
        na, nb = a.norm(), b.norm()
    else:
        na, nb = a.norm(dim=dim, keepdim=True), b.norm(dim=dim, keepdim=True)
    ua, ub = a / na, b / nb
    if dim is None:
        return 2 * torch.atan2((ua - ub).norm(), (ua + ub).norm())
    return 2 * torch.atan2((ua - ub).norm(dim=dim), (ua + ub).norm(dim=dim))


# -- which weights are scale-invariant ---------------------------------------------------------


def scale_invariant_names(module: nn.Module) -> set[str]:
    """Names (as in ``module.named_parameters()``) of the weights whose loss is scale-invariant.

    Marked: a parameter, or a module's ``weight``, with attribute ``scale_invariant = True``.
    Detected: inside an ``nn.Sequential``, a ``Linear`` or convolution followed directly by a batch
    norm (which removes any bias with the batch mean), or without bias by a ``LayerNorm`` /
    ``GroupNorm``. Exact up to the norm's ``eps``.
    """
    names: set[str] = set()
    convs = (nn.Linear, nn.modules.conv._ConvNd)
    batch_norms = (nn.modules.batchnorm._BatchNorm,)
    for prefix, m in module.named_modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for (name, a), (_, b) in zip(kids, kids[1:]):
                if isinstance(a, convs) and (isinstance(b, batch_norms)
                                             or (isinstance(b, NORM_LAYERS) and a.bias is None)):
                    names.add(f"{prefix}.{name}.weight" if prefix else f"{name}.weight")
        if getattr(m, "scale_invariant", False) and isinstance(getattr(m, "weight", None), nn.Parameter):
            names.add(f"{prefix}.weight" if prefix else "weight")
    for name, p in module.named_parameters():
        if getattr(p, "scale_invariant", False):
            names.add(name)
    return names


# -- the callback --------------------------------------------------------------------------------


class Mechanics(Callback):
    """Records the mechanics of one run (see the module docstring); the run's result carries
    :meth:`summary` (scalars) and :attr:`table` (per layer and checkpoint, column-wise).

    Args:
        regularizer: the arm's name (``decoupled``, ``l2``, ...); weight_decay: its λ.
        decay_all: as for the regularizer: the same tensors are followed.
        checkpoints: how many evenly spaced checkpoints record norms and angular updates.
        samples: on about how many evenly spaced steps the per-step angle is measured; at most one
            step in :data:`MIN_EVERY` is (unless ``every`` is given), yet at least two per checkpoint
            interval where the run is short enough to need more.
        every: measure the angle on one step in ``every`` (1: every step) instead.
    """

    def __init__(self, regularizer: str, weight_decay: float, decay_all: bool = False, *,
                 checkpoints: int = 10, samples: int = 200, every: int | None = None) -> None:
        self.every = every
        self.regularizer = regularizer
        self.weight_decay = float(weight_decay)
        self.decay_all = decay_all
        self.checkpoints = max(1, int(checkpoints))
        self.samples = max(1, int(samples))
        self.table: dict[str, list] = {}
        self.own_time = 0.0
        self.run_time = 0.0
        self._names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._lr_sum = 0.0
        self._steps = 0
        self._group: dict | None = None

    # -- set-up ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        t0 = time.perf_counter()
        self._run_start = t0
        self.own_time = 0.0
        regularized, _ = split_parameters(pl_module, self.decay_all) if trainer.optimizers else ([], [])
        ids = {id(p) for p in regularized}
        named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in ids]
        # a built-in task's module holds the backbone as ``model``: name layers by the backbone's names
        self._names = [n[len("model."):] if n.startswith("model.") else n for n, _ in named]
        self._params = [p for _, p in named]
        invariant = scale_invariant_names(pl_module)
        self._invariant = [n in invariant for n, _ in named]
        if not trainer.optimizers:  # nothing to follow (the run fails elsewhere with its own message)
            self.table, self._steps, self._opt_steps, self._start_step = {}, 0, 0, 0
            self._buffer = self._prev = self._group = None
            return
        opt = trainer.optimizers[0]
        group = next((g for g in opt.param_groups if any(id(p) in ids for p in g["params"])), opt.param_groups[0])
        self._opt, self._group = opt, group
        self._optimizer = "adam" if "betas" in group else "sgd" if "momentum" in group else type(opt).__name__.lower()
        self._beta1 = group["betas"][0] if "betas" in group else 0.0
        self._momentum = group.get("momentum", 0.0) or 0.0
        self._nesterov = bool(group.get("nesterov", False))
        self._lr0 = float(group.get("initial_lr", group["lr"]))
        self._peak = self._lr0
        self.total = max(1, int(trainer.estimated_stepping_batches))
        accumulate = max(1, trainer.accumulate_grad_batches)
        self.steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / accumulate)) \
            if math.isfinite(trainer.num_training_batches) else self.total / max(1, trainer.max_epochs or 1)
        self._rows = [p.shape[0] if p.ndim >= 2 else 1 for p in self._params]
        self._segments = torch.repeat_interleave(torch.arange(len(self._params)), torch.tensor(self._rows, dtype=torch.long)
                                                 ).to(self._params[0].device) if self._params else None
        # about `samples` steps, at most one in MIN_EVERY — but at least two per checkpoint interval in short runs
        self.stride = self.every or max(1, min(max(MIN_EVERY, self.total // self.samples),
                                               self.total // (2 * self.checkpoints)))
        marks = {round(k * self.total / self.checkpoints) for k in range(1, self.checkpoints + 1)}
        self._marks = sorted(m for m in marks if m > 0)
        self._lr_sum, self._steps, self._prev = 0.0, 0, None
        self._last_step = self._start_step = trainer.global_step
        self._opt_steps = 0
        self.table = {k: [] for k in ("step", "epoch", "layer", "numel", "scale_invariant", "weight_norm",
                                      "angular_update", "predicted_angular_update", "angular_samples",
                                      "neuron_spread", "effective_lr", "predicted_norm", "lr",
                                      "shrink_p10", "shrink_median", "shrink_p90")}
        self.prediction_note = equilibrium_angular_update(self._optimizer, self.regularizer, self._lr0,
                                                          self.weight_decay, lr0=self._lr0, beta1=self._beta1,
                                                          momentum=self._momentum, nesterov=self._nesterov)[1]
        self._reset_interval()
        self._checkpoint(trainer.global_step)
        self._buffer = [p.detach().clone() for p in self._params]  # the one copy this callback keeps
        if self._params and (trainer.global_step + 1) % self.stride == 0:  # the first step may be sampled too
            self._prev, self._prev_step = self._buffer, trainer.global_step
        self.own_time += time.perf_counter() - t0

    def _reset_interval(self) -> None:
        device = self._params[0].device if self._params else torch.device("cpu")
        n = len(self._params)
        self._angle_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._row_sum_all = torch.zeros(sum(self._rows), dtype=torch.float64, device=device)
        self._predicted_sum = 0.0
        self._count = 0

    # -- per step ------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._group is None:
            return
        self._opt_steps += 1  # counted here: reading trainer.global_step every batch costs more
        lr = self._group["lr"]
        self._lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        self._lr_sum += self._lr
        self._peak = max(self._peak, self._lr)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if not self._params:
            return
        n = self._start_step + self._opt_steps
        if n == self._last_step:  # no optimizer step on this batch (gradient accumulation)
            return
        t0 = time.perf_counter()
        self._last_step = n
        self._steps += 1
        with torch.no_grad():
            if self._prev is not None and self._prev_step == n - 1:
                self._measure_angles()
            self._prev = None
            if (n + 1) % self.stride == 0:
                torch._foreach_copy_(self._buffer, [p.detach() for p in self._params])
                self._prev, self._prev_step = self._buffer, n
            if self._marks and n >= self._marks[0]:
                while self._marks and n >= self._marks[0]:
                    self._marks.pop(0)
                self._checkpoint(n)
        self.own_time += time.perf_counter() - t0

    def _measure_angles(self) -> None:
        """Add the angle of this step's change to the interval's sums: per tensor and per row."""
        cur = [p.detach() for p in self._params]
        diffs = torch._foreach_sub(cur, self._prev)
        a, b, d = [], [], []
        for w, v, dw in zip(cur, self._prev, diffs):
            rows = w.shape[0] if w.ndim >= 2 else 1
            for out, x in ((a, v), (b, w), (d, dw)):
                out.append(torch.linalg.vector_norm(x.reshape(rows, -1), dim=1))
        # float32 norms suffice: the rounding of a − b is far below 4ab·sin²(θ/2) at any step's θ
        a, b, d = torch.cat(a).double(), torch.cat(b).double(), torch.cat(d).double()
        self._row_sum_all += _angle_from_norms(a, b, d)
        # the tensors' norms from their rows' (‖x‖² = Σ_rows ‖x_r‖²)
        seg = self._segments
        sums = [torch.zeros(len(self._params), dtype=torch.float64, device=a.device).index_add_(0, seg, x * x)
                for x in (a, b, d)]
        self._angle_sum += _angle_from_norms(*(x.sqrt() for x in sums))
        pred = self._predicted(self._lr)
        self._predicted_sum += pred if pred is not None else math.nan
        self._count += 1

    def _predicted(self, lr: float) -> float | None:
        return equilibrium_angular_update(self._optimizer, self.regularizer, lr, self.weight_decay, lr0=self._lr0,
                                          beta1=self._beta1, momentum=self._momentum, nesterov=self._nesterov)[0]

    @torch.no_grad()
    def _checkpoint(self, step: int) -> None:
        lr = getattr(self, "_lr", self._lr0)
        norms = torch.stack(torch._foreach_norm([p.detach() for p in self._params], 2, dtype=torch.float64)
                            ).tolist() if self._params else []
        angles = (self._angle_sum / self._count).tolist() if self._count else [None] * len(self._params)
        spread: list[float | None] = [None] * len(self._params)
        if self._count:
            many = [i for i, p in enumerate(self._params) if p.ndim >= 2 and p.shape[0] > 1]
            if many:  # per-neuron spread: coefficient of variation of the rows' mean angular updates
                rows = self._row_sum_all.split(self._rows)
                cv = torch.stack([rows[i].std() / rows[i].mean() for i in many]).tolist()
                for i, v in zip(many, cv):
                    spread[i] = v if math.isfinite(v) else None
        predicted = (self._predicted_sum / self._count) if self._count else None
        if predicted is not None and math.isnan(predicted):
            predicted = None
        shrink = self._l2_shrink(lr) if step > 0 else (None, None, None)
        t = self.table
        for i, name in enumerate(self._names):
            p = self._params[i]
            t["step"].append(step)
            t["epoch"].append(step / self.steps_per_epoch)
            t["layer"].append(name)
            t["numel"].append(p.numel())
            t["scale_invariant"].append(self._invariant[i])
            t["weight_norm"].append(norms[i])
            t["angular_update"].append(angles[i])
            t["predicted_angular_update"].append(predicted)
            t["angular_samples"].append(self._count)
            t["neuron_spread"].append(spread[i])
            t["effective_lr"].append(lr / norms[i] ** 2 if self._invariant[i] and norms[i] > 0 else None)
            t["predicted_norm"].append(equilibrium_norm(lr, self.weight_decay, p.numel(), regularizer=self.regularizer,
                                                        lr0=self._lr0) if self._optimizer == "adam" else None)
            t["lr"].append(lr)
            t["shrink_p10"].append(shrink[0])
            t["shrink_median"].append(shrink[1])
            t["shrink_p90"].append(shrink[2])
        self._reset_interval()

    def _l2_shrink(self, lr: float) -> tuple[float | None, float | None, float | None]:
        """L2 under Adam: the 10th, 50th and 90th percentiles over the regularized weights of the
        per-step shrink ``η·λ/(√v̂+ε)`` (v̂ the bias-corrected second moment); None otherwise."""
        if self.regularizer != "l2" or self._optimizer != "adam" or not self.weight_decay:
            return None, None, None
        group, state = self._group, self._opt.state
        beta2, eps = group["betas"][1], group["eps"]
        parts = []
        for p in self._params:
            s = state.get(p)
            if not s or "exp_avg_sq" not in s:
                continue
            step = float(s["step"])
            v_hat = s["exp_avg_sq"] / (1 - beta2 ** step)
            parts.append((lr * self.weight_decay / (v_hat.sqrt() + eps)).reshape(-1).float())
        if not parts:
            return None, None, None
        x = torch.cat(parts)
        if x.numel() > 1_000_000:  # torch.quantile's limit is 2**24; a fixed subsample is plenty
            x = x[torch.linspace(0, x.numel() - 1, 1_000_000, device=x.device).long()]
        q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], device=x.device)).tolist()
        return q[0], q[1], q[2]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        t0 = time.perf_counter()
        n = self._start_step + self._opt_steps
        if self._params and (not self.table["step"] or self.table["step"][-1] != n):
            self._checkpoint(n)  # a run that stopped early still ends on a checkpoint
        self._prev = self._buffer = None  # the copy is freed with the run
        self.own_time += time.perf_counter() - t0
        self.run_time = time.perf_counter() - self._run_start

    # -- results --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The run's scalars (:data:`SCALARS`): its timescale and length, integrated shrink,
        equilibrium ratio (per layer, measured over predicted angular update summed over the
        second half of training's checkpoints; median, min and max over the layers), the
        imbalance of the layers' angular updates over that half (max / min), and the overhead."""
        ts = timescale(self.regularizer, self._peak, self.weight_decay, self.steps_per_epoch)
        out: dict[str, Any] = {
            **ts,
            "steps_per_epoch": self.steps_per_epoch,
            "run_epochs": self._steps / self.steps_per_epoch,
            "integrated_shrink": self._integrated(),
        }
        ratios, means = [], []
        t = self.table
        half = self._steps / 2
        for name in self._names:
            rows = [i for i, (s, n) in enumerate(zip(t["step"], t["layer"])) if n == name and s > half
                    and t["angular_update"][i] is not None]
            w = [t["angular_samples"][i] for i in rows]
            if not rows or not sum(w):
                continue
            measured = sum(t["angular_update"][i] * t["angular_samples"][i] for i in rows) / sum(w)
            means.append(measured)
            pred = [t["predicted_angular_update"][i] for i in rows]
            if all(x is not None for x in pred):
                predicted = sum(x * t["angular_samples"][i] for x, i in zip(pred, rows)) / sum(w)
                if predicted > 0:
                    ratios.append(measured / predicted)
        ratios.sort()
        out["equilibrium_ratio"] = ratios[len(ratios) // 2] if ratios else None
        out["equilibrium_ratio_min"] = ratios[0] if ratios else None
        out["equilibrium_ratio_max"] = ratios[-1] if ratios else None
        out["angular_imbalance"] = max(means) / min(means) if len(means) > 1 and min(means) > 0 else None
        rest = self.run_time - self.own_time
        out["mechanics_overhead"] = self.own_time / rest if rest > 0 else None
        return out

    def _integrated(self) -> float | None:
        if self.regularizer == "decoupled":
            return self.weight_decay * self._lr_sum
        if self.regularizer == "independent":
            return self.weight_decay * self._lr_sum / self._lr0
        if self.regularizer == "l2" and self._optimizer == "sgd":
            return self.weight_decay * self._lr_sum  # plain SGD's shrink; momentum amplifies it by 1/(1−α)
        return None
