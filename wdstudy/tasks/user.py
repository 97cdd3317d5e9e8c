"""Your own model in a study: a task built by a factory you name by import path.

A spec's task may name a **factory** instead of a built-in ``MODEL-DATASET`` pair::

    tasks:
      - {name: my-net, factory: "mypkg.tasks:build", hidden: 64, epochs: 5}
      - {name: my-file-net, factory: "examples/my_task.py:build"}

``factory`` is ``module.path:attribute`` (imported as Python imports it; the directory
you run from is on the path) or ``path/to/file.py:attribute`` (a plain Python file,
relative to the directory you run from, as ``output`` is). Every key of the task other
than the study's training fields (:data:`TRAINING_FIELDS`: ``epochs``, ``batch_size``,
``eval_batch_size``, ``grad_clip``, ``precision``, ``accumulate_grad_batches``) is an
*option*: the factory receives the options as keyword arguments, and the cell records
the factory path and the options, so a changed option is a changed spec (refused on
resume). Two keywords are the study's, passed when the factory's signature names them
(or takes ``**kwargs``): ``lr``, the run's learning rate, and ``schedule``, the spec's
``constant`` or ``cosine`` (see below).

The factory returns a :class:`UserTask` (or the tuple ``(model, train, val, test)``):

* ``model`` is either

  - a plain ``torch.nn.Module`` mapping a batch of inputs to class logits: wdstudy
    trains it exactly as a built-in backbone (cross-entropy, the cell's base optimizer
    at the trial's learning rate with ``weight_decay=0``, the spec's schedule, the
    regularizer callback, ``grad_clip``), or
  - a whole ``LightningModule`` (the protocol below);

* ``train``, ``val``, ``test`` are each a pair of tensors ``(x, y)`` (inputs and integer
  labels; held in memory and batched by slicing, as the built-in tasks are) or any
  ``torch.utils.data.Dataset`` of ``(x, y)`` examples, for data that does not fit in memory:
  its batches come through a ``DataLoader`` with ``num_workers`` worker processes
  (persistent across epochs) and pinned memory when training on a GPU.

**The LightningModule protocol.** The module brings its own ``training_step`` (automatic
or manual optimization; gradient accumulation through the task field
``accumulate_grad_batches``, which Lightning implements), and:

1. its factory accepts ``lr`` and its ``configure_optimizers`` builds the optimizer with that
   learning rate and ``weight_decay=0`` (the regularizer callback is the only source of
   regularization; a non-zero ``weight_decay`` is refused, and so is an optimizer whose
   initial learning rate is not the trial's, or whose kind is not the cell's — ``adam``:
   ``Adam``/``AdamW``, ``sgd``: ``SGD``);
2. it owns its schedule: accept ``schedule`` to follow the spec's (``wdstudy.train.cosine_factor``
   is the built-in tasks' cosine), or state in your spec that it does something else;
3. ``module(x)`` returns class logits, so that wdstudy's final measurements (a full pass over
   train, validation and, for evaluation runs, test in eval mode: cross-entropy and error
   rate, as for built-in tasks) mean the same thing in every cell;
4. its ``validation_step`` logs ``val_loss`` and ``val_error`` (``self.log(...)``, reduced over
   the epoch) — the pruning callback and the per-epoch curves read them.

The study supplies the data loaders (the factory's splits, batched with the task's
``batch_size``, shuffled by the run's seed), adds the regularizer and pruning callbacks,
checks the optimizer, and measures. Gradient clipping (``grad_clip``) is Lightning's
``gradient_clip_val`` here (automatic optimization only): it runs after the regularizers'
``on_before_optimizer_step``, so L2 is clipped as a loss term would be.

**Seeds and data.** The factory is called once per run, after the global random number
generators are seeded with the run's seed, so the model's initialization follows the run's
seed as a built-in model's does. The data it returns must not depend on those generators
(draw synthetic data from your own ``torch.Generator``): every run of a study must see the
same splits. A factory whose data is expensive to load should cache it (``functools.lru_cache``
on a loader), since a worker process calls the factory for each of its runs.

A bad factory is reported before anything is written: :func:`check_factories` (run by
``launch`` and ``worker``) imports it and calls it once with its options, and a module that
cannot be imported, a missing attribute, a factory that raises or returns something else
ends in one line naming the spec file, the key and the value (exit code 2).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import WdstudyError, bad_value, one_line
from .data import Split

#: The study's own keywords for a factory, passed when its signature names them.
STUDY_KEYWORDS = ("lr", "schedule")


@dataclass
class UserTask:
    """What a task factory returns: the model and its three splits.

    ``model``: an ``nn.Module`` returning class logits, or a ``LightningModule`` (see the
    module docstring for its protocol). ``train`` / ``val`` / ``test``: ``(x, y)`` tensor
    pairs or ``torch.utils.data.Dataset`` objects of ``(x, y)`` examples. ``num_workers``:
    ``DataLoader`` worker processes for Dataset splits (0: load in the training process).

    Example: a factory in a file of its own, named by a task as ``factory: PATH:build``; the
    task's other keys (here ``dim``), except the training fields, are the factory's options::

        >>> import tempfile, textwrap
        >>> from pathlib import Path
        >>> from wdstudy.tasks import task_config
        >>> from wdstudy.tasks.user import build_user_task
        >>> folder = tempfile.TemporaryDirectory()
        >>> _ = (Path(folder.name) / "blobs.py").write_text(textwrap.dedent('''
        ...     import torch
        ...     from torch import nn
        ...     from wdstudy.tasks.user import UserTask
        ...
        ...     def build(dim=4, n=60):
        ...         g = torch.Generator().manual_seed(0)  # the data does not depend on the run's seed
        ...         x = torch.randn(n, dim, generator=g)
        ...         y = (x[:, 0] > 0).long()  # two classes
        ...         return UserTask(nn.Linear(dim, 2), (x[:40], y[:40]), (x[40:50], y[40:50]), (x[50:], y[50:]))
        ... '''))
        >>> task = task_config("blobs", factory=f"{folder.name}/blobs.py:build", dim=3, epochs=2)
        >>> task.options
        {'dim': 3}
        >>> built = build_user_task(task.factory, task.options, lr=0.1, schedule="constant")
        >>> built.model
        Linear(in_features=3, out_features=2, bias=True)
        >>> len(built.train), len(built.val), len(built.test)
        (40, 10, 10)
        >>> folder.cleanup()
    """

    model: nn.Module
    train: Any
    val: Any
    test: Any
    num_workers: int = 2


# -- finding the factory -------------------------------------------------------------------------


def _load_file(path: str) -> Any:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"no such file {str(file)!r}")
    # one module per file, under a stable name, so Dataset classes defined there pickle by reference
    name = f"wdstudy_user_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve_factory(path: str) -> Callable[..., Any]:
    """The callable named by ``module.path:attr`` or ``file.py:attr``; raises WdstudyError (field ``factory``)."""
    module_part, sep, attr = path.rpartition(":")
    if not sep or not module_part or not attr:
        raise bad_value("factory", path, "write module.path:function or path/to/file.py:function")
    try:
        if module_part.endswith(".py"):
            module = _load_file(module_part)
        else:
            module = importlib.import_module(module_part)
    except Exception as exc:
        raise bad_value("factory", path, f"cannot import {module_part!r} ({one_line(exc)})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise bad_value("factory", path, f"{module_part!r} has no attribute {attr!r}") from None
        target = getattr(target, part)
    if not callable(target):
        raise bad_value("factory", path, f"{attr!r} is a {type(target).__name__}, not a callable")
    return target


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind is not p.VAR_POSITIONAL or p.kind is p.VAR_KEYWORD for p in params)


# -- calling it ----------------------------------------------------------------------------------


def is_lightning_module(model: Any) -> bool:
    from lightning.pytorch import LightningModule

    return isinstance(model, LightningModule)


def _split(value: Any, key: str, path: str) -> Split | Dataset:
    if isinstance(value, Split):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, Tensor) for v in value):
        x, y = value
        if len(x) != len(y):
            raise bad_value("factory", path, f"{key}: {len(x)} inputs but {len(y)} labels")
        if y.dtype.is_floating_point or y.ndim != 1:
            raise bad_value("factory", path, f"{key}: labels must be a 1-d integer tensor, got {tuple(y.shape)} {y.dtype}")
        split = Split(x, y)
    elif isinstance(value, Dataset):
        split = value
    else:
        raise bad_value("factory", path, f"{key} is a {type(value).__name__}; give an (x, y) pair of tensors "
                        "or a torch.utils.data.Dataset")
    try:
        n = len(split)
    except TypeError:
        raise bad_value("factory", path, f"{key}: the Dataset has no length (an IterableDataset cannot be "
                        "split into the study's batches)") from None
    if n == 0:
        raise bad_value("factory", path, f"{key} has no examples")
    return split


def build_user_task(path: str, options: dict[str, Any], *, lr: float, schedule: str) -> UserTask:
    """Call the factory at ``path`` with ``options`` (and ``lr`` / ``schedule`` where it takes them).

    Returns a checked :class:`UserTask` whose splits are :class:`~wdstudy.tasks.data.Split`
    (tensors) or Datasets. Every problem is a WdstudyError naming ``factory=PATH``.
    """
    factory = resolve_factory(path)
    kwargs = dict(options)
    for key, value in zip(STUDY_KEYWORDS, (lr, schedule), strict=True):
        if _accepts(factory, key):
            if key in kwargs:
                raise bad_value("factory", path, f"{key!r} is set by the study, not by an option of the task")
            kwargs[key] = value
    try:
        out = factory(**kwargs)
    except WdstudyError:
        raise
    except Exception as exc:
        raise bad_value("factory", path, f"raised {one_line(exc)}") from None
    if isinstance(out, tuple) and len(out) == 4:
        out = UserTask(*out)
    if not isinstance(out, UserTask):
        raise bad_value("factory", path, f"returned a {type(out).__name__}; return "
                        "wdstudy.tasks.user.UserTask(model, train, val, test) or the tuple (model, train, val, test)")
    if not isinstance(out.model, nn.Module):
        raise bad_value("factory", path, f"model is a {type(out.model).__name__}, not a torch.nn.Module")
    if is_lightning_module(out.model) and not _accepts(factory, "lr"):
        raise bad_value("factory", path, "returns a LightningModule, so it must accept lr= (the study sets the "
                        "learning rate its optimizer is built with)")
    if not isinstance(out.num_workers, int) or out.num_workers < 0:
        raise bad_value("factory", path, f"num_workers={out.num_workers!r}: must be a whole number >= 0")
    return UserTask(out.model, _split(out.train, "train", path), _split(out.val, "val", path),
                    _split(out.test, "test", path), out.num_workers)


def check_factories(spec, where: str) -> None:
    """Import and call every factory task of ``spec`` once; the first problem raises a WdstudyError
    naming ``where`` (the spec file), the key ``tasks.I.factory`` and its value.

    Run before anything is written, so a typo ends the launch with exit code 2 instead of a
    study whose every trial fails. The factory is called with the lower end of the search's
    learning-rate range (for modules that take ``lr``); its model and data are then dropped.
    """
    for i, task in enumerate(spec.tasks):
        if task.factory is None:
            continue
        try:
            built = build_user_task(task.factory, task.options, lr=spec.search.lr.low, schedule=spec.schedule)
            check_user_task(task, built)
        except WdstudyError as exc:
            msg = str(exc)
            prefix = f"factory={task.factory!r}: "
            why = msg[len(prefix):] if msg.startswith(prefix) else msg
            raise WdstudyError(f"{where}: tasks.{i}.factory={task.factory!r}: {why}") from None


def check_user_task(task, built: UserTask) -> None:
    """What only the task's fields and the built model together can tell."""
    if task.accumulate_grad_batches > 1 and not (
        is_lightning_module(built.model) and built.model.automatic_optimization
    ):
        raise bad_value("factory", task.factory, f"accumulate_grad_batches={task.accumulate_grad_batches} needs a "
                        "LightningModule with automatic optimization (Lightning accumulates; a plain module is "
                        "trained with one optimizer step per batch)")
    if task.grad_clip and is_lightning_module(built.model) and not built.model.automatic_optimization:
        raise bad_value("factory", task.factory, "grad_clip needs automatic optimization in a LightningModule "
                        "(clip in your own training_step instead, after the regularizer)")


def optimizer_problem(opt: torch.optim.Optimizer, kind: str, lr: float) -> str | None:
    """Why ``opt`` is not the cell's base optimizer at ``lr`` (None if it is)."""
    wanted = {"adam": (torch.optim.Adam, torch.optim.AdamW), "sgd": (torch.optim.SGD,)}[kind]
    if not isinstance(opt, wanted):
        return (f"the LightningModule built {type(opt).__name__}, but this cell's optimizer is {kind!r} "
                f"({' or '.join(c.__name__ for c in wanted)})")
    for group in opt.param_groups:
        initial = float(group.get("initial_lr", group["lr"]))
        if not math.isclose(initial, lr, rel_tol=1e-9):
            return (f"the LightningModule's optimizer has learning rate {initial!r}, not the study's {lr!r} "
                    "(build it with the lr its factory received)")
    return None


__all__ = ["STUDY_KEYWORDS", "UserTask", "build_user_task", "check_factories", "resolve_factory"]
