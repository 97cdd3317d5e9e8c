"""``submit --slurm``: a study as one Slurm job array of worker pools, plus a final job.

Each array task is the ordinary worker pool of one node (``python -m wdstudy worker SPEC``):
one worker per GPU Slurm gave the task (``--gpus-per-node``, ``--per-device K`` packs K per
GPU), or one CPU worker per CPU (``--cpus-per-task``). All of them share the study's
storage, which must therefore be reachable from every node: a PostgreSQL URL for more than
one node; a journal file only for a single-node array (Optuna warns against SQLite and
journal files on NFS). A final job, which depends on the array (``afterany``), writes the
exports and the report.

Scripts are written by hand rather than through a pickling launcher: what runs is a plain
command line a person can read (``--dry-run`` prints it) and re-run by hand, and the worker's
own SIGTERM handling (fail and re-queue the running trial) is the only signal handling in
the job. Preemption and time limits: Slurm's SIGTERM before its kill reaches every worker,
which re-queues its trial; ``--requeue`` brings a preempted array task back, while one that
reached its time limit ends TIMEOUT and stays ended. Submitting again resumes: only the final
job if every unit is recorded, else a new array (budgets are totals).

A storage URL with a password stays off the scripts, their command lines and the printed output:
the jobs get it in their environment (``WDSTUDY_STORAGE``, which ``sbatch`` passes on by default),
and a job started without it stops at once with the reason instead of opening another storage.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WdstudyError
from .redact import passwords, redact, scrub
from .storage import is_rdb, resolve_url, shown

#: Slurm options that have their own flag here (``--slurm-arg`` must not set them behind its back).
OWN_OPTIONS = ("array", "nodes", "ntasks", "gpus-per-node", "cpus-per-task", "partition", "time", "account",
               "qos", "dependency", "requeue", "job-name", "output", "chdir")


@dataclass
class SlurmOptions:
    """What ``submit --slurm`` asks of Slurm; ``nodes`` is the number of array tasks (one node each)."""

    nodes: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    per_device: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        for name in ("nodes", "gpus_per_node", "cpus_per_task", "per_device", "array_parallelism"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise WdstudyError(f"--{name.replace('_', '-')}={value}: must be >= 1")
        if self.per_device is not None and not self.gpus_per_node:
            raise WdstudyError(f"--per-device={self.per_device}: applies to GPU workers only "
                               "(give --gpus-per-node, or --cpus-per-task for CPU workers)")
        for key in self.extra:
            if key in OWN_OPTIONS:
                raise WdstudyError(f"--slurm-arg {key}=...: use its own option (--{key}) "
                                   "or leave it to submit")


def parse_slurm_args(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs (``--slurm-arg mem=8G``) as sbatch options; a bare ``KEY`` is a flag."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or any(c.isspace() for c in key):
            raise WdstudyError(f"--slurm-arg {item!r}: expected KEY=VALUE, e.g. mem=8G or constraint=a100")
        out[key] = value if sep else ""
    return out


def check_storage(url: str, nodes: int) -> None:
    """Refuse a storage the nodes cannot share safely, with the reason in one line."""
    if url.startswith("postgresql"):
        return
    if url.startswith("sqlite"):
        raise WdstudyError(f"storage={redact(url)!r}: SQLite locks up with many workers and on network file systems; "
                           "give a PostgreSQL URL (--storage postgresql://USER@HOST/DB)")
    if is_rdb(url):
        raise WdstudyError(f"storage={redact(url)!r}: give a PostgreSQL URL for a Slurm job")
    if nodes > 1:
        raise WdstudyError(f"storage={url!r}: a journal file is safe for one node only (file locks over NFS are not); "
                           f"--nodes={nodes} needs a PostgreSQL URL (--storage postgresql://USER@HOST/DB)")


def _directives(opts: dict[str, str | None]) -> list[str]:
    lines = []
    for key, value in opts.items():
        if value is None:
            continue
        lines.append(f"#SBATCH --{key}" + (f"={value}" if value != "" else ""))
    return lines


def secret(url: str) -> bool:
    """Whether ``url`` carries a password (then it goes to the jobs in their environment only); an
    empty one (``USER:@HOST``) is none."""
    return bool(passwords(url))


def _storage(url: str) -> tuple[list[str], list[str]]:
    """The storage's arguments of a job's command line and the script lines that go with them."""
    if not secret(url):
        return ["--storage", url], []
    return [], [f"# storage {redact(url)}: given in the job's environment (WDSTUDY_STORAGE), password kept out",
                ': "${WDSTUDY_STORAGE:?is not set: submit passes the storage in the environment of each job '
                'with sbatch --export=ALL, the default}"']


def _common(o: SlurmOptions) -> dict[str, str | None]:
    return {"partition": o.partition, "account": o.account, "qos": o.qos}


def worker_script(spec_path: str, url: str, name: str, log_dir: Path, o: SlurmOptions, workdir: str) -> str:
    """The array's batch script: each task runs the worker pool of its node."""
    array = f"0-{o.nodes - 1}" + (f"%{o.array_parallelism}" if o.array_parallelism else "")
    storage_args, storage_lines = _storage(url)
    cmd = [sys.executable, "-m", "wdstudy", "worker", spec_path, *storage_args, "--quiet"]
    opts: dict[str, str | None] = {"job-name": f"wdstudy-{name}", "array": array, "nodes": "1", "ntasks": "1"}
    if o.gpus_per_node:
        opts["gpus-per-node"] = str(o.gpus_per_node)
        opts["cpus-per-task"] = str(o.cpus_per_task) if o.cpus_per_task else None
        cmd += ["--devices", "auto"] + (["--per-device", str(o.per_device)] if o.per_device else [])
        if o.cpus_per_task:
            cmd += ["--threads", str(max(1, o.cpus_per_task // (o.gpus_per_node * (o.per_device or 1))))]
    else:
        cpus = o.cpus_per_task or 1
        opts["cpus-per-task"] = str(cpus)
        cmd += ["--devices", "cpu", "--workers", str(cpus), "--threads", "1"]
    opts.update(_common(o))
    opts["time"] = o.time
    opts["requeue"] = ""
    opts["output"] = str(log_dir / "slurm-%A_%a.out")
    opts["open-mode"] = "append"
    opts["chdir"] = workdir
    opts.update(o.extra)
    return "\n".join(["#!/bin/bash", *_directives(opts),
                      "# one worker pool per array task; Slurm's SIGTERM (time limit, preemption, scancel)",
                      "# makes every worker fail and re-queue its running trial before it exits",
                      *storage_lines, "export PYTHONUNBUFFERED=1", "exec " + shlex.join(cmd), ""])


def finish_script(spec_path: str, url: str, name: str, log_dir: Path, o: SlurmOptions, workdir: str,
                  after: str | None) -> str:
    """The final job: exports and the report, once the array has ended (``afterany``)."""
    opts: dict[str, str | None] = {"job-name": f"wdstudy-{name}-report", "nodes": "1", "ntasks": "1",
                                   "cpus-per-task": "1", **_common(o)}
    if after:
        opts["dependency"] = f"afterany:{after}"
    opts["output"] = str(log_dir / "slurm-%j-report.out")
    opts["open-mode"] = "append"
    opts["chdir"] = workdir
    storage_args, storage_lines = _storage(url)
    cmd = [sys.executable, "-m", "wdstudy", "submit", spec_path, *storage_args, "--finish"]
    return "\n".join(["#!/bin/bash", *_directives(opts), *storage_lines, "export PYTHONUNBUFFERED=1",
                      "exec " + shlex.join(cmd), ""])


def _sbatch(script: Path, url: str) -> str:
    env = {**os.environ, "WDSTUDY_STORAGE": url} if secret(url) else None  # sbatch passes it to the job
    try:
        r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120,
                           env=env)
    except OSError as exc:
        raise WdstudyError(f"sbatch: cannot run it ({exc.strerror})") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise WdstudyError(f"sbatch {script}: {scrub(why)}")
    return r.stdout.strip().split(";")[0]


def active_jobs(name: str) -> list[str]:
    """Ids of this study's pending or running Slurm jobs (its array tasks and final job)."""
    r = subprocess.run(["squeue", "-h", "--name", f"wdstudy-{name},wdstudy-{name}-report", "-o", "%i %T"],
                       capture_output=True, text=True, timeout=60)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def submit(spec_path: str, storage: str | None, o: SlurmOptions, dry_run: bool = False) -> int:
    """Validate the spec, create the cells, write and submit the batch scripts; print how to follow."""
    from .launch import checked_spec, create_cells

    o.check()
    spec, url = checked_spec(spec_path, storage)
    check_storage(url, o.nodes)
    export = o.extra.get("export", "ALL")
    if secret(url) and export.split(",")[0] != "ALL" and "WDSTUDY_STORAGE" not in export.split(","):
        raise WdstudyError(f"--slurm-arg export={export}: the jobs get the storage's password in their environment "
                           "(WDSTUDY_STORAGE); use export=ALL or list WDSTUDY_STORAGE")
    spec_abs = str(Path(spec_path).resolve())
    if not is_rdb(url):
        url = str(Path(url).resolve())
    out = spec.output_dir().resolve()
    log_dir = out / "logs"
    workdir = os.getcwd()
    if dry_run:  # the scripts only: nothing is opened, written or submitted
        print(f"# {out / 'slurm' / 'workers.sbatch'}")
        print(worker_script(spec_abs, url, spec.name, log_dir, o, workdir))
        print(f"# {out / 'slurm' / 'report.sbatch'}")
        print(finish_script(spec_abs, url, spec.name, log_dir, o, workdir, "ARRAY_JOB_ID"))
        return 0
    if shutil.which("sbatch") is None:
        raise WdstudyError("--slurm: sbatch is not on the PATH (run submit on a Slurm login node)")
    running = active_jobs(spec.name)
    if running:
        print(f"study {spec.name} already has Slurm jobs {', '.join(running)} pending or running; "
              "nothing submitted (follow them with squeue, or scancel them first)", file=sys.stderr)
        return 1
    create_cells(spec, url, spec_path)  # validated and created before anything is submitted
    remaining = _remaining(spec, url)
    log_dir.mkdir(parents=True, exist_ok=True)
    folder = out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    array_id = None
    if remaining:
        w = folder / "workers.sbatch"
        w.write_text(worker_script(spec_abs, url, spec.name, log_dir, o, workdir))
        array_id = _sbatch(w, url)
    f = folder / "report.sbatch"
    f.write_text(finish_script(spec_abs, url, spec.name, log_dir, o, workdir, array_id))
    report_id = _sbatch(f, url)
    if array_id:
        print(f"submitted array {array_id} ({o.nodes} task(s)) for the {remaining} unit(s) left, "
              f"and report job {report_id} after it")
    else:
        print(f"every unit is recorded: submitted only report job {report_id}")
    if secret(url):  # the commands a person types: the password stays in WDSTUDY_STORAGE, out of sight
        where, how = "", f" (with WDSTUDY_STORAGE set to the storage, {redact(url)})"
    else:
        where, how = f" --storage {shlex.quote(url if is_rdb(url) else shown(url))}", ""
    print(f"follow: squeue --name wdstudy-{spec.name},wdstudy-{spec.name}-report · "
          f"python -m wdstudy status {shlex.quote(spec_path)}{where} · "
          f"python -m wdstudy dashboard {shlex.quote(spec_path)}{where}{how}")
    print(f"logs: {shown(log_dir)}; run the same command again to resume an unfinished study")
    return 0


def _remaining(spec, url: str) -> int:
    from .analysis import progress_frame
    from .launch import remaining_units
    from .storage import open_storage

    df = progress_frame(open_storage(url), spec.name)
    # before its search ends a cell does not know its evaluation yet: unfinished budgets count
    return remaining_units(df) if not df.empty else 1


def finish(spec_path: str, storage: str | None) -> int:
    """What the final job runs: the exports, the summary and the report from the storage."""
    from .analysis import export
    from .launch import summary_text, write_report
    from .spec import load_spec
    from .storage import open_storage

    spec = load_spec(spec_path)
    url = resolve_url(spec, storage)
    store = open_storage(url)
    paths = export(store, spec.name, spec.output_dir())
    print(summary_text(store, spec.name))
    print(f"exported {', '.join(shown(p) for p in paths)}")
    write_report(spec_path, storage)
    if _remaining(spec, url):
        print("wdstudy: the study is unfinished; submit it again to resume", file=sys.stderr)
        return 1
    return 0
