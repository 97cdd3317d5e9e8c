"""Command line: ``python -m wdstudy COMMAND ...``.

A user's mistake (a bad name, value or file) ends in one ``wdstudy: error: ...``
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import WdstudyError


def _parse_set(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WdstudyError(f"{item!r}: expected KEY=VALUE, e.g. width=128")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise WdstudyError(f"{key.strip()}={value!r}: not a valid value (YAML syntax)") from None
    return out


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def cmd_train(args: argparse.Namespace) -> int:
    from .arms import BY_NAME
    from .tasks import task_config
    from .train import DivergedError, optimizer_config, train_run

    overrides = _parse_set(args.set)
    for field in ("epochs", "batch_size", "data_dir"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.download:
        overrides["download"] = True
    if args.precision is not None:
        overrides["precision"] = args.precision
    if args.regularizer is None:  # name the arm that really runs: no λ, no regularization
        args.regularizer = "decoupled" if args.weight_decay else "none"
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
        f"seed {args.seed}, {m['device']}, precision {m['precision']})"
    )
    metric = task.metric  # the error rate, or a regression's MSE
    print(f"  {'split':<6} {'loss':>8} {metric.name:>8}")
    for split in ("train", "val", "test"):
        if f"{split}_loss" in m:
            shown = _fmt_pct(m[split + "_error"]) if metric.is_rate else _fmt(m[split + "_error"])
            print(f"  {split:<6} {_fmt(m[split + '_loss']):>8} {shown:>8}")
    ref = "test" if "gap_error" in m else "val"
    prefix = "" if ref == "test" else "val_"
    gap = m[prefix + "gap_error"]
    print(
        f"  gap ({ref} − train): loss {m[prefix + 'gap_loss']:+.4f}, "
        + (f"error {100 * gap:+.2f} points" if metric.is_rate else f"MSE {gap:+.4f}")
    )
    arm = BY_NAME[args.regularizer]
    penalty = f"{arm.norm} penalty" if arm.kind == "penalty" else "penalty"  # L2's or L1's; none for the decays
    print(
        f"  regularized-weight norm {m['weight_norm']:.4f} · {penalty} "
        f"{_fmt(m['penalty'], 6)} · {m['steps']} steps in {m['wall_time_s']:.1f} s"
    )
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import launch

    return launch(args.spec, storage=args.storage, devices=args.devices, workers=args.workers, quiet=args.quiet,
                  threads=args.threads, dry_run=args.dry_run, per_device=args.per_device,
                  landscape_axis=args.landscape_axis)


def cmd_worker(args: argparse.Namespace) -> int:
    from .launch import plan_slots, prepare, run_pool
    from .outage import STORAGE_UNWRITABLE, StorageFault, exit_code

    # the plan first: a bad option is refused before anything is written
    slots = None if args.single else plan_slots(args.devices, args.workers, args.threads, args.per_device)
    # creates the cells if this worker is first; a worker started by launch needs no factory check.
    # One worker waits for a storage that is down (within WDSTUDY_STORAGE_OUTAGE): an outage is no crash
    try:
        spec, url = prepare(args.spec, args.storage, check_factories=not args.single, wait=args.single)
    except StorageFault as exc:
        print(f"wdstudy: {exc}", file=sys.stderr, flush=True)
        return exit_code(exc)
    if not args.single:
        try:
            return 0 if run_pool(args.spec, spec, url, slots, quiet=args.quiet) else 1
        except KeyboardInterrupt:
            print("wdstudy: worker pool stopped; its trials were re-queued.", file=sys.stderr)
            return 130
    # one worker, in this process (what launch starts per device)
    from . import signals
    from .launch import DEVICE_FAULT, DEVICE_UNUSABLE
    from .train import DeviceFault, DeviceUnavailable
    from .worker import Worker

    signals.install()
    threads = args.threads or int(os.environ.get("WDSTUDY_THREADS", "1"))
    try:
        import torch

        torch.set_num_threads(threads)
        n = Worker(spec, url).run()
    except signals.WorkerStopped as exc:
        print(f"wdstudy: worker {os.getpid()} {exc}; its trial was re-queued", file=sys.stderr)
        return 130
    except DeviceUnavailable as exc:  # its trial is failed with this reason and re-queued
        print(f"wdstudy: worker {os.getpid()}: {exc}", file=sys.stderr)
        return DEVICE_UNUSABLE
    except DeviceFault as exc:  # its trial is failed as lost and re-queued; launch starts a fresh process
        print(f"wdstudy: worker {os.getpid()}: device error, exiting so a fresh process takes over: {exc}",
              file=sys.stderr)
        return DEVICE_FAULT
    except StorageFault as exc:  # a full disk, a long outage: the launcher stops the pool
        try:
            print(f"wdstudy: {exc}", file=sys.stderr, flush=True)
        except OSError:  # its log on the full disk: the launcher says so
            pass
        return exit_code(exc)
    except OSError as exc:  # its log on a full disk: the same stop (the message may not get written)
        from .outage import classify, unwritable

        if classify(exc) != "unwritable":
            raise
        try:
            print(f"wdstudy: {unwritable(exc, exc.filename or 'its log')}", file=sys.stderr, flush=True)
        except OSError:
            pass
        return STORAGE_UNWRITABLE
    print(f"worker {os.getpid()} finished after {n} units", flush=True)
    # Everything is stored (each record is written before the storage call returns) and the log
    # is flushed: skip the interpreter's teardown of torch and Lightning, seconds of CPU that would
    # compete with the launcher's report on a small machine.
    sys.stderr.flush()
    os._exit(0)


def cmd_submit(args: argparse.Namespace) -> int:
    from . import slurm

    if args.finish:
        return slurm.finish(args.spec, args.storage)
    if not args.slurm:
        raise WdstudyError("submit: name the scheduler (--slurm); other schedulers run `wdstudy worker` per node")
    opts = slurm.SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        per_device=args.per_device, partition=args.partition, time=args.time, account=args.account, qos=args.qos,
        array_parallelism=args.array_parallelism, extra=slurm.parse_slurm_args(args.slurm_arg))
    return slurm.submit(args.spec, args.storage, opts, dry_run=args.dry_run)


def cmd_claims(args: argparse.Namespace) -> int:
    from .claims import run_claims
    from .train import quiet_lightning

    quiet_lightning()
    # --quick never overwrites the committed report: its numbers are a smoke test's
    out = Path(args.out or ("reports/claims-quick" if args.quick else "reports/claims"))
    from .preflight import writable

    writable(out, f"--out={str(out)!r}")  # before minutes of training, not after
    claims = run_claims(out, quick=args.quick, log=lambda m: print(m, flush=True))
    width = max(len(c.key) for c in claims)
    for c in claims:
        print(f"{c.key:<{width}}  {c.verdict}")
    print(f"wrote {out / 'claims.csv'}, {out / 'report.html'} and {out / 'report.pdf'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import main

    return main(args.spec, args.effect, args.studies, workers=args.workers, landscape=args.landscape,
                source=args.source, study=args.study, save=args.save_landscape, first=args.first)


def cmd_report(args: argparse.Namespace) -> int:
    from .launch import write_report
    from .preflight import check_output
    from .spec import load_spec

    if args.landscape_axis is not None:
        from .spec import check_landscape_axis

        check_landscape_axis(args.landscape_axis)
    check_output(load_spec(args.spec))  # the report's folder can be written, before the work of drawing it
    return write_report(args.spec, args.storage, landscape_axis=args.landscape_axis)


def cmd_status(args: argparse.Namespace) -> int:
    from .analysis import progress_frame
    from .cells import spec_drift
    from .launch import format_progress
    from .spec import load_spec
    from .storage import NotLaunched, open_existing, resolve_url, storage_label

    spec = load_spec(args.spec)
    url = resolve_url(spec, args.storage)
    try:
        storage = open_existing(url)
    except NotLaunched:
        print(f"study {spec.name}: not started (no storage at {url})")
        return 0
    df = progress_frame(storage, spec.name)
    print(f"study {spec.name} · storage {storage_label(url)}")
    drift = spec_drift(spec, storage)
    if drift:
        print(f"note: {drift}")
    print(format_progress(df) if not df.empty else "no cells yet")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from .spec import load_spec
    from .storage import open_existing, resolve_url

    spec = load_spec(args.spec)
    storage = open_existing(resolve_url(spec, args.storage))
    _check_port(args.host, args.port)
    print(f"Optuna dashboard for study {spec.name}: http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    run_server(storage, host=args.host, port=args.port)
    return 0


def _check_port(host: str, port: int) -> None:
    """Refuse a port the dashboard could not listen on, before it says it listens there."""
    import socket

    if not 0 < port < 65536:
        raise WdstudyError(f"--port={port}: must be between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WdstudyError(f"--host={host!r}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the dashboard's server does
        try:
            probe.bind(address)
        except OSError as exc:
            raise WdstudyError(f"--port={port}: cannot listen on {host}:{port} ({exc.strerror}); "
                               f"choose another port, e.g. --port {port + 1}") from None


def cmd_repair(args: argparse.Namespace) -> int:
    from .journal import RESERVE_SUFFIX, is_reserve, repair
    from .spec import load_spec
    from .storage import is_rdb, resolve_url

    target = args.target
    if target.endswith((".yaml", ".yml")):
        url = resolve_url(load_spec(target), args.storage)
    else:
        url = args.storage or target
    if is_rdb(url):
        from .redact import redact

        raise WdstudyError(f"storage={redact(url)!r}: a database keeps its own records whole; "
                           "repair applies to journal files")
    if is_reserve(url):
        raise WdstudyError(f"storage={url!r}: is the journal's disk reserve, not a journal; "
                           f"repair {url[: -len(RESERVE_SUFFIX)]}")
    if not Path(url).is_file():
        raise WdstudyError(f"storage={url!r}: no such journal file")

    def confirm(question: str) -> bool:
        if args.yes:
            return True
        print(f"{question} [y/N] ", end="", flush=True)
        answer = sys.stdin.readline().strip().lower()
        return answer in ("y", "yes")

    print("stop every launch and worker of this study before repairing its journal")
    return 1 if repair(url, confirm) < 0 else 0


def _tasks_epilog() -> str:
    """The built-in tasks, one kind a line (never wrapped inside a name)."""
    from .tasks.names import CLASSIFICATION, CLASSIFIERS, REGRESSION, REGRESSORS

    return "\n".join([
        "built-in tasks (MODEL-DATASET):",
        f"  classification (cross-entropy; error in %): models {', '.join(CLASSIFIERS)}",
        f"    on datasets {', '.join(CLASSIFICATION)}, e.g. mlp-mnist1d, cnn-cifar10",
        f"  regression (mean squared error; the error is the MSE): {', '.join(REGRESSORS)} on {', '.join(REGRESSION)}",
        "  linear models:",
        "    logreg-mnist1d   multinomial logistic regression: one linear layer",
        "    linreg-curve1d   linear regression on 40 fixed RBF features of noisy samples",
        "                     of a smooth curve (try --lr 0.1)",
    ])


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .spec import OPTIMIZERS, REGULARIZER_NAMES, SCHEDULES

    parser = argparse.ArgumentParser(
        prog="wdstudy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Does decoupled weight decay (AdamW/SGDW) generalize better than L2 regularization on your\n"
                     "models, and how do λ and the learning rate interact? wdstudy runs a study from one YAML spec\n"
                     "(search, race, evaluation over seeds) and writes an HTML and a PDF report."),
        epilog="first run: python -m wdstudy launch examples/my_study.yaml   (about 25 s on 2 cores)")
    parser.add_argument("--version", action="version", version=f"wdstudy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one training run of a task, printing its metrics",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_tasks_epilog())
    p.add_argument("--task", required=True, help="a built-in task, MODEL-DATASET (listed below)")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--regularizer", choices=list(REGULARIZER_NAMES),
                   help="default: decoupled with a --weight-decay above 0, else none")
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
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"],
                   help="Lightning accelerator; gpu fails when no GPU is usable (never falls back to the CPU)")
    p.add_argument("--precision", help="32 (default), bf16-mixed or 16-mixed (on a CPU: fp16 autocast + GradScaler)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task override, e.g. width=128")
    p.add_argument(
        "--optimizer-set", action="append", default=[], metavar="KEY=VALUE",
        help="optimizer setting, e.g. momentum=0.8, betas=[0.9,0.99], eps=1e-6",
    )
    p.add_argument("--json", action="store_true", help="print metrics and per-epoch history as JSON")
    p.set_defaults(func=cmd_train)

    def spec_and_storage(p):
        p.add_argument("spec", help="study spec, e.g. studies/quickstart.yaml")
        p.add_argument("--storage", help="Optuna storage URL (default: the spec's, else OUTPUT/optuna.journal)")

    def pool_options(p):
        p.add_argument("--devices", default="auto",
                       help="auto (one worker per GPU, else CPU workers), cpu, or device ids like 0,1")
        p.add_argument("--workers", type=int, help="number of CPU workers (default: one per core)")
        p.add_argument("--per-device", type=int, metavar="K",
                       help="K workers per GPU (default 1); refused when no GPU is planned")
        p.add_argument("--threads", type=int,
                       help="torch threads per worker (default: the cores divided between the workers)")
        p.add_argument("--quiet", action="store_true", help="no live progress display")

    def landscape_axis(p):  # checked by wdstudy.spec.check_landscape_axis: one error line, not argparse's usage
        p.add_argument("--landscape-axis", metavar="{auto,lambda,tau_epoch}",
                       help="the landscape figure's y axis for the decoupled-decay arms: lambda (λ), tau_epoch "
                            "(their timescale in epochs, with the band from one epoch to the training length) or "
                            "auto (tau_epoch when searched over timescale_epochs); default: the spec's "
                            "report.landscape_axis, else auto")

    p = sub.add_parser("launch", help="run a study: search every cell, evaluate, export")
    spec_and_storage(p)
    pool_options(p)
    landscape_axis(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned worker slots (devices, threads, accelerator) and exit; touches no storage")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("worker", help="join a study's workers (e.g. from another machine)")
    spec_and_storage(p)
    pool_options(p)
    p.add_argument("--single", action="store_true", help="run one worker in this process")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("simulate", help="size a study: its whole procedure on a synthetic landscape, "
                                        "how often each decision comes out")
    p.add_argument("spec", help="the study spec (its search, race, rounds and decision settings)")
    p.add_argument("--effect", type=float, nargs="+", default=[0.0, 1.0, 2.0],
                   help="true differences (first primary arm − second) in points (MSE for a regression)")
    p.add_argument("--studies", type=int, default=200, help="simulated studies per effect")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--landscape", help="a YAML file of landscape numbers per task")
    p.add_argument("--from", dest="source", metavar="STORAGE", help="fit the landscape from a finished study")
    p.add_argument("--study", help="the study's name in --from's storage (default: the spec's)")
    p.add_argument("--save-landscape", metavar="FILE", help="write the landscape used to FILE")
    p.add_argument("--first", type=int, default=0, help="first simulated study number (another sample)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("submit", help="run a study as a Slurm job array of workers plus a report job")
    spec_and_storage(p)
    p.add_argument("--slurm", action="store_true", help="submit to Slurm (sbatch)")
    p.add_argument("--nodes", type=int, default=1, help="array tasks, one node each (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per task: one worker per GPU (--per-device K packs K)")
    p.add_argument("--per-device", type=int, metavar="K", help="K workers per GPU")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task: one CPU worker each without GPUs (default 1)")
    for opt in ("partition", "time", "account", "qos"):
        p.add_argument(f"--{opt}", help=f"sbatch --{opt}")
    p.add_argument("--array-parallelism", type=int, metavar="N", help="at most N array tasks at once")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. mem=16G or constraint=a100 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts; submit nothing")
    p.add_argument("--finish", action="store_true", help=argparse.SUPPRESS)  # what the report job runs
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("report", help="write report.html and report.pdf from the study's storage")
    spec_and_storage(p)
    landscape_axis(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="progress of a study, without running anything")
    spec_and_storage(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("claims", help="measure what the textbooks claim about weight decay (reports/claims/)")
    p.add_argument("--out", help="output folder (default reports/claims; with --quick reports/claims-quick)")
    p.add_argument("--quick", action="store_true", help="fewer epochs, λ values and seeds (for tests)")
    p.set_defaults(func=cmd_claims)

    p = sub.add_parser("repair", help="set a journal's damaged records aside, keeping every complete one")
    p.add_argument("target", help="study spec (its journal) or a journal file, e.g. reports/NAME/optuna.journal")
    p.add_argument("--storage", help="the journal file, when the spec's is not the one")
    p.add_argument("--yes", action="store_true", help="do not ask for a confirmation")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the study's storage")
    spec_and_storage(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .outage import StorageFault, classify, unwritable
    from .redact import scrub

    def scrubbed_traceback(kind, value, tb):  # a bug keeps its traceback, without a password in it
        import traceback

        sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))

    sys.excepthook = scrubbed_traceback
    try:
        return args.func(args)
    except StorageFault as exc:  # a full disk, a storage gone for too long: not the user's input
        print(f"wdstudy: error: {scrub(str(exc))}", file=sys.stderr)
        return 1
    except WdstudyError as exc:
        for line in str(exc).splitlines():
            print(f"wdstudy: error: {scrub(line)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if classify(exc) != "unwritable":
            raise
        print(f"wdstudy: error: {unwritable(exc, exc.filename or 'the output')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wdstudy: interrupted", file=sys.stderr)
        return 130
