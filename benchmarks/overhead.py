"""Overhead of a wdstudy training run against a plain PyTorch loop doing the same work.

For each MNIST-1D task, both sides train the same model (same init), on the same
in-memory data, batch size, optimizer (Adam + decoupled weight decay, i.e. AdamW in
the plain loop), cosine schedule and epochs, with the same running loss and error per epoch,
one validation pass per epoch and a final evaluation of the train and validation splits. The two are run alternately,
``--repeats`` times each, and the ratio of the medians is printed: timings are taken
on a shared, noisy machine, so only the ratio in one run means anything.

    python benchmarks/overhead.py [--epochs 10] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from wdstudy.regularizers import split_parameters
from wdstudy.tasks import task_config
from wdstudy.train import cosine_factor, evaluate, train_run

TASKS = ("mlp-mnist1d", "cnn-mnist1d", "gru-mnist1d")
TARGETS = {"mlp-mnist1d": 1.5, "cnn-mnist1d": 1.15, "gru-mnist1d": 1.15}
LR, WD = 1e-3, 0.1


def plain_run(task, data, seed: int = 0) -> float:
    """The same training written as a plain PyTorch loop; returns the final val error."""
    torch.manual_seed(seed)
    model = task.build_model()
    decay, no_decay = split_parameters(model)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )
    n, b = len(data.train), task.batch_size
    steps_per_epoch = math.ceil(n / b)
    total = task.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total))
    x, y = data.train.x, data.train.y
    for epoch in range(task.epochs):
        model.train()
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        losses, wrong = [], []
        for i in range(steps_per_epoch):
            sel = idx[i * b : (i + 1) * b]
            logits = model(x[sel])
            loss = F.cross_entropy(logits, y[sel])
            losses.append(loss.detach())  # the same running metrics wdstudy records
            wrong.append((logits.detach().argmax(1) != y[sel]).sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        float(torch.stack(losses).mean()), float(torch.stack(wrong).sum())
        evaluate(model, data.val, task.eval_batch_size)  # per-epoch validation
    evaluate(model, data.train, task.eval_batch_size)
    return evaluate(model, data.val, task.eval_batch_size)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a study worker uses few)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in TASKS:
        task = task_config(name, epochs=args.epochs)
        data = task.load_data()
        # warm-up of both paths (imports, allocator, Lightning's first Trainer)
        train_run(task, "adam", "decoupled", LR, WD, data=data, accelerator="cpu")
        plain_run(task, data)
        ours, plain = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            train_run(task, "adam", "decoupled", LR, WD, data=data, accelerator="cpu")
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain_run(task, data)
            plain.append(time.perf_counter() - t)
        o, p = statistics.median(ours), statistics.median(plain)
        rows.append((name, p, o, o / p, TARGETS[name]))

    print(f"{args.epochs} epochs, batch {task.batch_size}, {args.threads} thread(s), median of {args.repeats}")
    print("| task | plain PyTorch (s) | wdstudy (s) | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for name, p, o, r, target in rows:
        flag = "" if r <= target else " (over)"
        print(f"| {name} | {p:.2f} | {o:.2f} | {r:.2f}×{flag} | ≤ {target}× |")


if __name__ == "__main__":
    main()
