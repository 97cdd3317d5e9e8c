"""Command line: ``python -m wdstudy COMMAND ...``.

A user's mistake (a bad name, value or file) ends in one ``wdstudy: error: ...``
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import WdstudyError


def _parse_set(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WdstudyError(f"{item!r}: expected KEY=VALUE, e.g. width=128")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def cmd_train(args: argparse.Namespace) -> int:
    from .tasks import task_config
    from .train import DivergedError, optimizer_config, train_run

    overrides = _parse_set(args.set)
    for field in ("epochs", "batch_size", "data_dir"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.download:
        overrides["download"] = True
    task = task_config(args.task, **overrides)
    optimizer = optimizer_config(args.optimizer, **_parse_set(args.optimizer_set))
    try:
        result = train_run(
            task,
            optimizer,
            args.regularizer,
            args.lr,
            args.weight_decay,
            seed=args.seed,
            schedule=args.schedule,
            decay_all=args.decay_all,
            with_test=args.test,
            accelerator=args.accelerator,
        )
    except DivergedError as exc:
        print(f"wdstudy: training diverged: {exc}", file=sys.stderr)
        return 1
    m = result.metrics
    if args.json:
        print(json.dumps({"task": task.model_dump(), "metrics": m, "history": result.history}, indent=2))
        return 0
    print(
        f"{task.name} · {args.optimizer} · {args.regularizer} "
        f"(λ={args.weight_decay:g}, lr={args.lr:g}, {args.schedule}, {m['epochs']} epochs, "
        f"seed {args.seed}, {m['device']})"
    )
    print(f"  {'split':<6} {'loss':>8} {'error':>8}")
    for split in ("train", "val", "test"):
        if f"{split}_loss" in m:
            print(f"  {split:<6} {_fmt(m[split + '_loss']):>8} {_fmt_pct(m[split + '_error']):>8}")
    ref = "test" if "gap_error" in m else "val"
    prefix = "" if ref == "test" else "val_"
    print(
        f"  gap ({ref} − train): loss {m[prefix + 'gap_loss']:+.4f}, "
        f"error {100 * m[prefix + 'gap_error']:+.2f} points"
    )
    print(
        f"  regularized-weight norm {m['weight_norm']:.4f} · L2 penalty "
        f"{_fmt(m['l2_penalty'], 6)} · {m['steps']} steps in {m['wall_time_s']:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .regularizers import REGULARIZERS
    from .train import OPTIMIZERS, SCHEDULES

    parser = argparse.ArgumentParser(prog="wdstudy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one training run of a task, printing its metrics")
    p.add_argument("--task", required=True, help="e.g. mlp-mnist1d, cnn-mnist1d, gru-mnist1d, cnn-cifar10")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--regularizer", default="decoupled", choices=list(REGULARIZERS))
    p.add_argument("--weight-decay", type=float, default=0.0, help="λ (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    p.add_argument("--epochs", type=int, help="override the task's epochs")
    p.add_argument("--batch-size", type=int, help="override the task's batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decay-all", action="store_true", help="also regularize biases and normalization parameters")
    p.add_argument("--test", action="store_true", help="also measure the test split")
    p.add_argument("--data-dir", help="folder of a torchvision dataset")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task override, e.g. width=128")
    p.add_argument(
        "--optimizer-set", action="append", default=[], metavar="KEY=VALUE",
        help="optimizer setting, e.g. momentum=0.8, betas=[0.9,0.99], eps=1e-6",
    )
    p.add_argument("--json", action="store_true", help="print metrics and per-epoch history as JSON")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except WdstudyError as exc:
        for line in str(exc).splitlines():
            print(f"wdstudy: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wdstudy: interrupted", file=sys.stderr)
        return 130
