"""Interchangeable regularizer callbacks: L2 and L1 penalties, three weight decays, none.

All callbacks share one constructor shape, ``Cls(weight_decay, decay_all=False)``,
so that swapping one for another is the only difference between the arms of a
comparison. Each works through Lightning's ``on_before_optimizer_step`` hook, which
runs once per optimizer step (also under gradient accumulation), after the gradients
are complete (and, under mixed precision, unscaled) and before gradient clipping and
the optimizer's own update. With ``λ = weight_decay``, ``w`` a regularized parameter,
``g`` its gradient, ``η_t`` the current learning rate of its parameter group (after
any scheduler) and ``η_0`` the group's initial learning rate:

================  ================================  ==============================================
name              class                             what it does before the optimizer step
================  ================================  ==============================================
``l2``            :class:`L2Regularization`         ``g <- g + λ·w``, the gradient of ``λ/2·‖w‖₂²``
``l1``            :class:`L1Regularization`         ``g <- g + λ·sign(w)``, the gradient of ``λ·‖w‖₁``
``decoupled``     :class:`DecoupledWeightDecay`     ``w <- (1 - η_t·λ)·w``
``independent``   :class:`IndependentWeightDecay`   ``w <- (1 - (η_t/η_0)·λ)·w``
``l1-decoupled``  :class:`DecoupledL1`              ``w <- sign(w)·max(|w| - η_t·λ, 0)``
``none``          :class:`NoRegularization`         nothing: the baseline arm
================  ================================  ==============================================

* The *penalties* (``l2``, ``l1``) change the gradient, so the added term goes
  *through* gradient clipping and the optimizer (Adam divides it by
  ``sqrt(v) + eps``), exactly as the same term added to the loss would. With
  ``Adam(weight_decay=0)``, ``l2`` reproduces ``Adam(weight_decay=λ)``; with ``SGD``
  it reproduces ``SGD(weight_decay=λ)``.
* The *decays* (``decoupled``, ``independent``, ``l1-decoupled``) change the weights
  and leave the gradient alone, so the optimizer then steps on the gradient computed
  at the weights before the change, as in PyTorch's ``AdamW``. With
  ``Adam(weight_decay=0)``, ``decoupled`` reproduces ``AdamW(weight_decay=λ)`` and
  ``independent`` reproduces ``AdamW(weight_decay=λ/η_0)``: its shrink follows the
  learning-rate schedule but not the base learning rate (the schedule multiplier of
  Loshchilov & Hutter's AdamW). ``l1-decoupled`` is the proximal step of
  ``η_t·λ·‖w‖₁`` (soft thresholding): it sets weights to exactly zero.

Under mixed precision with a ``GradScaler`` (Lightning's ``MixedPrecision`` plugin
with ``precision="16-mixed"``, which unscales the gradients before calling
``on_before_optimizer_step``), every callback does nothing on a step that the scaler
skips because a gradient is inf or NaN, just as ``GradScaler.step`` skips ``AdamW``'s
decay together with the rest of its update.

Which parameters are regularized is decided by :func:`split_parameters`: by default
every parameter except biases and normalization-layer parameters (as timm and
torchvision's reference scripts do), or all of them with ``decay_all=True``. All
methods use the same function, so they always regularize the same set.

The base optimizer must be built with ``weight_decay=0``: a callback refuses to run
with an optimizer that regularizes on its own, since that would regularize twice.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.amp.grad_scaler import OptState

from .arms import NAMES
from .errors import WdstudyError, bad_value, check_number

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def split_parameters(
    module: nn.Module, decay_all: bool = False
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``module``'s trainable parameters into ``(regularized, not_regularized)``.

    Not regularized, unless ``decay_all``: biases (any parameter named ``bias`` or
    ``bias_*``, such as a GRU's ``bias_ih_l0``), every parameter of a normalization
    layer, and any other parameter with fewer than two dimensions. Parameters with
    ``requires_grad=False`` appear in neither list. Order follows ``module.parameters()``.

    Example::

        >>> from torch import nn
        >>> from wdstudy.regularizers import split_parameters
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> regularized, not_regularized = split_parameters(model)
        >>> [tuple(p.shape) for p in regularized]  # the two weight matrices
        [(8, 4), (2, 8)]
        >>> [tuple(p.shape) for p in not_regularized]  # a bias, the LayerNorm's weight and bias, a bias
        [(8,), (8,), (8,), (2,)]
        >>> [len(group) for group in split_parameters(model, decay_all=True)]
        [6, 0]
    """
    norm_params = {
        id(p) for m in module.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        excluded = id(p) in norm_params or leaf == "bias" or leaf.startswith("bias_") or p.ndim < 2
        (no_decay if excluded and not decay_all else decay).append(p)
    return decay, no_decay


def _scalar(value: float | torch.Tensor) -> float:
    """A group's ``lr`` (or ``initial_lr``) as a Python float; it may be a tensor."""
    return float(value) if isinstance(value, torch.Tensor) else value


class Regularizer(Callback, ABC):
    """The base of every regularizer callback: parameter selection, optimizer checks, skipped
    steps, norms, history. A subclass names its arm (:attr:`name`, a name of
    :data:`wdstudy.arms.NAMES`) and implements :meth:`_apply_group`, what it does to one
    optimizer group's regularized parameters before the optimizer step."""

    #: Name used in study specs and storage (the arm's name in :mod:`wdstudy.arms`).
    name: str = ""

    def __init__(self, weight_decay: float = 0.0, decay_all: bool = False) -> None:
        super().__init__()
        self.weight_decay = check_number(weight_decay, "weight_decay")
        self.decay_all = bool(decay_all)
        self._params: list[nn.Parameter] = []
        # optimizer id -> [(param_group, regularized params of that group)]
        self._groups: dict[int, list[tuple[dict, list[nn.Parameter]]]] = {}
        #: One row per finished training epoch: ``epoch``, ``weight_norm`` and
        #: ``penalty`` (the value of :meth:`penalty`, whichever norm the arm penalizes).
        self.history: list[dict[str, float | int | None]] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight_decay={self.weight_decay!r}, decay_all={self.decay_all!r})"

    # -- parameter bookkeeping -------------------------------------------------------

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The regularized parameters (known once fitting has started)."""
        return self._params

    def attach(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Select ``module``'s regularized parameters and map them to optimizer groups.

        Lightning calls this at the start of training; call it yourself to use the
        callback's :meth:`apply` outside a Trainer.
        """
        self._params, _ = split_parameters(module, self.decay_all)
        wanted = {id(p) for p in self._params}
        self._groups = {}
        for opt in optimizers:
            groups = []
            for group in opt.param_groups:
                wd = group.get("weight_decay", 0.0)
                if wd:
                    raise WdstudyError(
                        f"optimizer weight_decay={wd!r}: {type(opt).__name__} must be built with "
                        f"weight_decay=0 when {type(self).__name__} is the regularizer "
                        "(otherwise the parameters are regularized twice)"
                    )
                groups.append((group, [p for p in group["params"] if id(p) in wanted]))
            self._groups[id(opt)] = groups

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.history = []
        self.attach(pl_module, trainer.optimizers)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.apply(optimizer, scaler=getattr(trainer.precision_plugin, "scaler", None))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        squared = self.squared_norm()  # once per epoch: the norm and an L2 penalty both come from it
        self.history.append({"epoch": trainer.current_epoch, "weight_norm": math.sqrt(squared),
                             "penalty": self.penalty(squared)})

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """Regularize the parameters of ``optimizer`` for the step it is about to take.

        Only parameters that have a gradient are touched, as the optimizer only
        updates those. With an enabled ``scaler``, the gradients must already be
        unscaled (``scaler.unscale_(optimizer)``, which Lightning's ``MixedPrecision``
        plugin calls before ``on_before_optimizer_step``); if the scaler found an inf
        or NaN gradient, ``scaler.step(optimizer)`` will skip the step and this method
        changes nothing either.

        Raises:
            WdstudyError: ``scaler`` is enabled but has not unscaled ``optimizer``'s
                gradients, as with optimizers that unscale inside their own step
                (``fused=True``): the regularizer would act on scaled gradients.
        """
        if self.weight_decay == 0.0:
            return
        work = []
        for group, params in self._groups.get(id(optimizer), ()):
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                work.append((group, with_grad))
        if not work:
            return
        keep = None if scaler is None else self._scaler_keep(scaler, optimizer)
        for group, params in work:
            self._apply_group(group, params, keep)

    def _scaler_keep(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """On the device, 1.0 if ``scaler.step(optimizer)`` will take this step and 0.0 if it will
        skip it (inf/NaN gradients); None when there is nothing to check. Never read on the host:
        reading it would make every step wait for the device."""
        if not scaler.is_enabled():
            return None
        # GradScaler keeps no public record of what unscale_ found; these are the
        # attributes its own step() reads (torch.amp.grad_scaler.GradScaler._maybe_opt_step).
        if scaler._per_optimizer_states[id(optimizer)]["stage"] is not OptState.UNSCALED:
            raise WdstudyError(
                f"{type(self).__name__} needs unscaled gradients, but the GradScaler has not unscaled "
                f"those of {type(optimizer).__name__} (optimizers that unscale inside their own step, "
                "such as fused ones, cannot be used with mixed precision here)"
            )
        if not self.changes_weights:
            # a gradient term on a step the scaler skips changes nothing (the step is skipped and the
            # gradients are cleared): no check at all
            return None
        found = sum(scaler._found_inf_per_device(optimizer).values())
        return (found == 0).to(torch.float32)

    @abstractmethod
    def _apply_group(self, group: dict, params: list[nn.Parameter], keep: torch.Tensor | None = None) -> None:
        """Regularize one optimizer ``group``'s regularized ``params`` that have a gradient; ``keep``
        (a device tensor, see :meth:`_scaler_keep`) turns a weight change into none on a step the
        scaler skips, without a host sync."""

    # -- what gets logged -----------------------------------------------------------

    @torch.no_grad()
    def squared_norm(self) -> float:
        """``sum(w**2)`` over the regularized parameters, accumulated in float64."""
        if not self._params:
            return 0.0
        norms = torch._foreach_norm([p.detach() for p in self._params], 2, dtype=torch.float64)
        return float(torch.stack(norms).square().sum())

    def weight_norm(self) -> float:
        """Euclidean norm of all regularized parameters taken together."""
        return math.sqrt(self.squared_norm())

    @torch.no_grad()
    def l1_norm(self) -> float:
        """``sum(|w|)`` over the regularized parameters, accumulated in float64."""
        if not self._params:
            return 0.0
        norms = torch._foreach_norm([p.detach() for p in self._params], 1, dtype=torch.float64)
        return float(torch.stack(norms).sum())

    @torch.no_grad()
    def zero_fraction(self) -> float:
        """Fraction of the regularized parameters' entries that are exactly zero.

        Counts ``0.0`` and ``-0.0`` alike over all regularized parameters taken
        together; ``0.0`` when there are none.
        """
        total = sum(p.numel() for p in self._params)
        if not total:
            return 0.0
        zeros = sum(int((p.detach() == 0).sum()) for p in self._params)
        return zeros / total

    #: Whether the method changes the weights itself (the decays) rather than the gradients (L2, L1).
    changes_weights = True

    def penalty(self, squared_norm: float | None = None) -> float | None:
        """The term this method adds to the objective, at the current weights (``squared_norm``:
        ``sum(w**2)`` if already computed).

        ``weight_decay / 2 * ||w||_2^2`` for L2 regularization,
        ``weight_decay * ||w||_1`` for L1 regularization, and ``None`` for methods
        that add no term to the objective (the weight decays, none).
        """
        return None


class L2Regularization(Regularizer):
    """L2 regularization: ``g <- g + weight_decay * w`` before the optimizer sees ``g``.

    Equivalent to adding ``weight_decay / 2 * ||w||_2^2`` to the loss, including its
    place before gradient clipping.

    Example: one step of plain SGD (a Trainer calls :meth:`attach` and :meth:`apply` itself)::

        >>> import torch
        >>> from torch import nn
        >>> from wdstudy.regularizers import L2Regularization
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> _ = nn.init.constant_(layer.weight, 2.0)
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.25)  # weight_decay=0: the callback regularizes
        >>> reg = L2Regularization(weight_decay=0.5)
        >>> reg.attach(layer, [opt])
        >>> layer.weight.grad = torch.zeros_like(layer.weight)  # the loss's gradient, zero here
        >>> reg.apply(opt)  # g <- g + 0.5 * w
        >>> layer.weight.grad.tolist()
        [[1.0, 1.0]]
        >>> opt.step()  # w <- w - 0.25 * g
        >>> layer.weight.tolist()
        [[1.75, 1.75]]
        >>> reg.penalty()  # 0.5 / 2 * (1.75**2 + 1.75**2)
        1.53125
    """

    name = "l2"

    def _apply_group(self, group: dict, params: list[nn.Parameter], keep: torch.Tensor | None = None) -> None:
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, params, alpha=self.weight_decay)

    changes_weights = False

    def penalty(self, squared_norm: float | None = None) -> float | None:
        return 0.5 * self.weight_decay * (self.squared_norm() if squared_norm is None else squared_norm)


class L1Regularization(Regularizer):
    """L1 regularization: ``g <- g + weight_decay * sign(w)`` before the optimizer sees ``g``.

    Equivalent, bit for bit, to adding ``weight_decay * ||w||_1`` to the loss and
    differentiating with autograd (whose derivative of ``|w|`` is ``sign(w)``, ``0``
    at ``w = 0``), including its place before gradient clipping. A subgradient
    method: it drives weights towards zero but does not set them to exactly zero.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from wdstudy.regularizers import L1Regularization
        >>> layer = nn.Linear(3, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[2.0, -0.5, 0.0]]))
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.25)
        >>> reg = L1Regularization(weight_decay=0.5)
        >>> reg.attach(layer, [opt])
        >>> layer.weight.grad = torch.zeros_like(layer.weight)
        >>> reg.apply(opt)  # g <- g + 0.5 * sign(w)
        >>> layer.weight.grad.tolist()
        [[0.5, -0.5, 0.0]]
        >>> reg.penalty()  # 0.5 * (2 + 0.5 + 0)
        1.25
    """

    name = "l1"

    def _apply_group(self, group: dict, params: list[nn.Parameter], keep: torch.Tensor | None = None) -> None:
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=self.weight_decay)

    changes_weights = False

    def penalty(self, squared_norm: float | None = None) -> float | None:
        return self.weight_decay * self.l1_norm()


class DecoupledWeightDecay(Regularizer):
    """Decoupled weight decay: ``w <- (1 - lr_t * weight_decay) * w`` before the step.

    ``lr_t`` is the parameter group's current learning rate, read at every step, so a
    learning-rate schedule scales the decay exactly as in PyTorch's ``AdamW``. The
    gradient the optimizer then uses was computed at the weights before the shrink,
    as in ``AdamW``.

    Example: the weight shrinks by exactly ``lr * weight_decay`` of itself, the gradient stays::

        >>> import torch
        >>> from torch import nn
        >>> from wdstudy.regularizers import DecoupledWeightDecay
        >>> layer = nn.Linear(2, 1)
        >>> _ = nn.init.constant_(layer.weight, 2.0)
        >>> _ = nn.init.constant_(layer.bias, 2.0)
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.25)
        >>> reg = DecoupledWeightDecay(weight_decay=0.5)
        >>> reg.attach(layer, [opt])
        >>> layer(torch.ones(1, 2)).sum().backward()  # the gradient of the weight is [[1, 1]]
        >>> reg.apply(opt)  # w <- (1 - 0.25 * 0.5) * w
        >>> layer.weight.tolist(), layer.bias.tolist()  # the bias is not regularized
        ([[1.75, 1.75]], [2.0])
        >>> layer.weight.tolist() == [[2.0 * (1 - 0.25 * 0.5)] * 2]
        True
        >>> layer.weight.grad.tolist()
        [[1.0, 1.0]]
        >>> reg.penalty() is None  # a decay adds no term to the objective
        True
    """

    name = "decoupled"

    def _apply_group(self, group: dict, params: list[nn.Parameter], keep: torch.Tensor | None = None) -> None:
        _shrink(params, 1 - _scalar(group["lr"]) * self.weight_decay, keep)


class IndependentWeightDecay(Regularizer):
    """Learning-rate-independent weight decay: ``w <- (1 - s_t * weight_decay) * w`` before the step.

    ``s_t = lr_t / lr_0`` is the schedule multiplier: ``lr_t`` is the parameter
    group's current learning rate and ``lr_0`` its ``initial_lr`` (which PyTorch's
    learning-rate schedulers set), or, if the group has none, its learning rate when
    the callback was attached (at the start of training). The shrink therefore follows
    the schedule but not the base learning rate, as in Loshchilov & Hutter's AdamW
    algorithm: with a constant schedule it multiplies every regularized weight by
    ``1 - weight_decay`` before each step. With ``Adam(weight_decay=0)`` this
    reproduces ``AdamW(weight_decay=weight_decay / lr_0)``.

    Raises:
        WdstudyError: at :meth:`attach`, if a group holding regularized parameters
            starts with a learning rate of zero (``s_t`` is undefined).

    Example: the shrink is ``weight_decay`` at the initial learning rate, and follows the schedule::

        >>> import torch
        >>> from torch import nn
        >>> from wdstudy.regularizers import IndependentWeightDecay
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> _ = nn.init.constant_(layer.weight, 2.0)
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.25)
        >>> reg = IndependentWeightDecay(weight_decay=0.5)
        >>> reg.attach(layer, [opt])
        >>> layer.weight.grad = torch.zeros_like(layer.weight)
        >>> reg.apply(opt)  # s_t = 1: w <- (1 - 0.5) * w, whatever the learning rate
        >>> layer.weight.tolist()
        [[1.0, 1.0]]
        >>> opt.param_groups[0]["lr"] = 0.125  # a schedule halves the learning rate: s_t = 0.5
        >>> reg.apply(opt)  # w <- (1 - 0.5 * 0.5) * w
        >>> layer.weight.tolist()
        [[0.75, 0.75]]
    """

    name = "independent"

    def __init__(self, weight_decay: float = 0.0, decay_all: bool = False) -> None:
        super().__init__(weight_decay, decay_all)
        # id(param_group) -> learning rate at attach time (used without "initial_lr")
        self._lr_at_attach: dict[int, float] = {}

    def attach(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        super().attach(module, optimizers)
        self._lr_at_attach = {}
        for groups in self._groups.values():
            for group, params in groups:
                self._lr_at_attach[id(group)] = _scalar(group["lr"])
                if params and self.weight_decay and not self._initial_lr(group):
                    raise bad_value(
                        "lr", self._initial_lr(group),
                        "independent weight decay divides by the initial learning rate, which must not be 0",
                    )

    def _initial_lr(self, group: dict) -> float:
        if "initial_lr" in group:
            return _scalar(group["initial_lr"])
        return self._lr_at_attach[id(group)]

    def _apply_group(self, group: dict, params: list[nn.Parameter], keep: torch.Tensor | None = None) -> None:
        multiplier = _scalar(group["lr"]) / self._initial_lr(group)
        _shrink(params, 1 - multiplier * self.weight_decay, keep)


class DecoupledL1(Regularizer):
    """Decoupled L1 (soft thresholding): ``w <- sign(w) * max(|w| - lr_t * weight_decay, 0)``.

    Applied before the step, like :class:`DecoupledWeightDecay`, with ``lr_t`` the
    parameter group's current learning rate; the gradient the optimizer then uses was
    computed at the weights before the thresholding. This is the proximal operator of
    ``lr_t * weight_decay * ||w||_1``: every entry moves towards zero by
    ``lr_t * weight_decay``, and entries within that distance of zero become exactly
    zero (see :meth:`zero_fraction`). Computed as ``w - clamp(w, -t, t)`` with
    ``t = lr_t * weight_decay``, which equals the formula above exactly in floating point.

    Example: with ``t = 0.25 * 0.5 = 0.125``, every entry moves 0.125 towards zero or stops at zero::

        >>> import torch
        >>> from torch import nn
        >>> from wdstudy.regularizers import DecoupledL1
        >>> layer = nn.Linear(3, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[2.0, -0.5, 0.0625]]))
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.25)
        >>> reg = DecoupledL1(weight_decay=0.5)
        >>> reg.attach(layer, [opt])
        >>> layer.weight.grad = torch.zeros_like(layer.weight)
        >>> reg.apply(opt)
        >>> layer.weight.tolist()
        [[1.875, -0.375, 0.0]]
        >>> reg.zero_fraction()
        0.3333333333333333
    """

    name = "l1-decoupled"

    def _apply_group(self, group: dict, params: list[nn.Parameter], keep: torch.Tensor | None = None) -> None:
        t = _scalar(group["lr"]) * self.weight_decay
        if keep is None:
            inside = torch._foreach_clamp_max(params, t)
            torch._foreach_clamp_min_(inside, -t)
        else:  # a threshold of 0 on a skipped step, chosen on the device
            bound = torch.where(keep > 0, t, 0.0)
            inside = [torch.clamp(p, -bound, bound) for p in params]
        torch._foreach_sub_(params, inside)


class NoRegularization(Regularizer):
    """The baseline arm: no regularization. Still records the weight norm per epoch.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from wdstudy.regularizers import NoRegularization
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.25)
        >>> reg = NoRegularization()
        >>> reg.attach(layer, [opt])
        >>> layer.weight.grad = torch.zeros_like(layer.weight)
        >>> reg.apply(opt)  # changes nothing
        >>> layer.weight.tolist(), layer.weight.grad.tolist()
        ([[3.0, 4.0]], [[0.0, 0.0]])
        >>> reg.weight_norm()  # what it records: the norm of the weights the other arms regularize
        5.0
        >>> NoRegularization(weight_decay=0.1)
        Traceback (most recent call last):
        ...
        wdstudy.errors.WdstudyError: weight_decay=0.1: the 'none' regularizer takes no weight decay
    """

    name = "none"

    def __init__(self, weight_decay: float = 0.0, decay_all: bool = False) -> None:
        super().__init__(check_number(weight_decay, "weight_decay"), decay_all)
        if self.weight_decay != 0.0:
            raise bad_value("weight_decay", weight_decay, "the 'none' regularizer takes no weight decay")

    def _apply_group(self, group: dict, params: list[nn.Parameter],
                     keep: torch.Tensor | None = None) -> None:  # pragma: no cover
        return


def _shrink(params: list[nn.Parameter], factor: float, keep: torch.Tensor | None) -> None:
    """``w <- factor·w``; with ``keep`` (device), by ``factor`` or by exactly 1 on a skipped step,
    chosen on the device. The factor is rounded to the weights' precision as the plain scalar is,
    so both paths give the same weights bit for bit."""
    if keep is None:
        torch._foreach_mul_(params, factor)
    else:
        torch._foreach_mul_(params, torch.where(keep > 0, factor, 1.0).to(params[0].dtype))


#: One callback class per arm of :mod:`wdstudy.arms`, by its name (the order of the registry's
#: first release, which users' code may rely on).
REGULARIZERS: dict[str, type[Regularizer]] = {cls.name: cls for cls in (
    L2Regularization, DecoupledWeightDecay, NoRegularization, IndependentWeightDecay, L1Regularization, DecoupledL1)}
assert set(REGULARIZERS) == set(NAMES), "every arm of wdstudy.arms has its callback class"


def make_regularizer(name: str, weight_decay: float = 0.0, decay_all: bool = False) -> Regularizer:
    """Build a regularizer callback by its registry name (a key of :data:`REGULARIZERS`):
    ``l2``, ``decoupled``, ``none``, ``independent``, ``l1`` or ``l1-decoupled``.

    Example::

        >>> from wdstudy.regularizers import make_regularizer
        >>> make_regularizer("decoupled", 0.1)
        DecoupledWeightDecay(weight_decay=0.1, decay_all=False)
        >>> make_regularizer("l2", 1e-4, decay_all=True)
        L2Regularization(weight_decay=0.0001, decay_all=True)
        >>> make_regularizer("l3", 0.1)
        Traceback (most recent call last):
        ...
        wdstudy.errors.WdstudyError: regularizer='l3': unknown; choose one of l2, decoupled, ...
    """
    try:
        cls = REGULARIZERS[name]
    except KeyError:
        raise bad_value("regularizer", name, f"unknown; choose one of {', '.join(REGULARIZERS)}") from None
    return cls(weight_decay, decay_all=decay_all)
