"""Interchangeable regularizer callbacks: L2 regularization, decoupled weight decay, none.

The three callbacks share one constructor shape, ``Cls(weight_decay, decay_all=False)``,
so that swapping one for another is the only difference between the arms of a
comparison. Each works through Lightning's ``on_before_optimizer_step`` hook, which
runs once per optimizer step (also under gradient accumulation), after the gradients
are complete and before gradient clipping and the optimizer's own update:

* :class:`L2Regularization` adds ``weight_decay * w`` to the gradient of every
  regularized parameter, exactly what a ``weight_decay / 2 * ||w||^2`` term in the
  loss would add. The sum goes *through* the optimizer (Adam divides it by
  ``sqrt(v) + eps``). With ``Adam(weight_decay=0)`` this reproduces
  ``Adam(weight_decay=weight_decay)``; with ``SGD`` it reproduces ``SGD(weight_decay=...)``.
* :class:`DecoupledWeightDecay` multiplies every regularized parameter by
  ``1 - lr_t * weight_decay``, where ``lr_t`` is the current learning rate of the
  parameter's group (after any scheduler), before the optimizer step on the plain
  gradient. With ``Adam(weight_decay=0)`` this reproduces ``AdamW(weight_decay=...)``.
* :class:`NoRegularization` changes nothing: the baseline arm.

Which parameters are regularized is decided by :func:`split_parameters`: by default
every parameter except biases and normalization-layer parameters (as timm and
torchvision's reference scripts do), or all of them with ``decay_all=True``. Both
methods use the same function, so they always regularize the same set.

The base optimizer must be built with ``weight_decay=0``: a callback refuses to run
with an optimizer that regularizes on its own, since that would regularize twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

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


class _Regularizer(Callback):
    """Shared machinery: parameter selection, optimizer checks, norms and history."""

    #: Name used in study specs and storage.
    name: str = ""

    def __init__(self, weight_decay: float = 0.0, decay_all: bool = False) -> None:
        super().__init__()
        self.weight_decay = check_number(weight_decay, "weight_decay")
        self.decay_all = bool(decay_all)
        self._params: list[nn.Parameter] = []
        # optimizer id -> [(param_group, regularized params of that group)]
        self._groups: dict[int, list[tuple[dict, list[nn.Parameter]]]] = {}
        #: One row per finished training epoch: ``epoch``, ``weight_norm``, ``l2_penalty``.
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
        self.apply(optimizer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.history.append(
            {"epoch": trainer.current_epoch, "weight_norm": self.weight_norm(), "l2_penalty": self.penalty()}
        )

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Regularize the parameters of ``optimizer`` for the step it is about to take."""
        if self.weight_decay == 0.0:
            return
        for group, params in self._groups.get(id(optimizer), ()):
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                self._apply_group(group, with_grad)

    def _apply_group(self, group: dict, params: list[nn.Parameter]) -> None:
        raise NotImplementedError

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

    def penalty(self) -> float | None:
        """The L2 term ``weight_decay / 2 * ||w||^2`` this method adds to the objective.

        ``None`` for methods that add no term to the objective (decoupled decay, none).
        """
        return None


class L2Regularization(_Regularizer):
    """L2 regularization: ``g <- g + weight_decay * w`` before the optimizer sees ``g``.

    Equivalent to adding ``weight_decay / 2 * ||w||^2`` to the loss, including its
    place before gradient clipping.
    """

    name = "l2"

    def _apply_group(self, group: dict, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, params, alpha=self.weight_decay)

    def penalty(self) -> float | None:
        return 0.5 * self.weight_decay * self.squared_norm()


class DecoupledWeightDecay(_Regularizer):
    """Decoupled weight decay: ``w <- (1 - lr_t * weight_decay) * w`` before the step.

    ``lr_t`` is the parameter group's current learning rate, read at every step, so a
    learning-rate schedule scales the decay exactly as in PyTorch's ``AdamW``. The
    gradient the optimizer then uses was computed at the weights before the shrink,
    as in ``AdamW``.
    """

    name = "decoupled"

    def _apply_group(self, group: dict, params: list[nn.Parameter]) -> None:
        lr = group["lr"]
        lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        torch._foreach_mul_(params, 1 - lr * self.weight_decay)


class NoRegularization(_Regularizer):
    """The baseline arm: no regularization. Still records the weight norm per epoch."""

    name = "none"

    def __init__(self, weight_decay: float = 0.0, decay_all: bool = False) -> None:
        super().__init__(check_number(weight_decay, "weight_decay"), decay_all)
        if self.weight_decay != 0.0:
            raise bad_value("weight_decay", weight_decay, "the 'none' regularizer takes no weight decay")

    def _apply_group(self, group: dict, params: list[nn.Parameter]) -> None:  # pragma: no cover
        return


REGULARIZERS: dict[str, type[_Regularizer]] = {
    cls.name: cls for cls in (L2Regularization, DecoupledWeightDecay, NoRegularization)
}


def make_regularizer(name: str, weight_decay: float = 0.0, decay_all: bool = False) -> _Regularizer:
    """Build a regularizer callback by its name: ``l2``, ``decoupled`` or ``none``."""
    try:
        cls = REGULARIZERS[name]
    except KeyError:
        raise bad_value("regularizer", name, f"unknown; choose one of {', '.join(REGULARIZERS)}") from None
    return cls(weight_decay, decay_all=decay_all)
