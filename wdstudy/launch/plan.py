"""Planning a launch: the devices this machine offers and one environment per worker slot.

Imports no torch: GPUs are found through ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from ..errors import WdstudyError


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without importing torch: the entries of
    ``CUDA_VISIBLE_DEVICES`` (ids, UUIDs or MIG ids, in order) when it is set, else the
    devices ``nvidia-smi -L`` lists, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return _entries(env)
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def _entries(visible: str) -> list[str]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value names (``-1``: none)."""
    return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]


def parse_nvidia_smi(listing: str) -> list[str]:
    """Devices of ``nvidia-smi -L``: each GPU's index, except that a GPU split into MIG
    instances gives its instances' UUIDs instead (CUDA sees the instances, not the GPU)."""
    devices: list[str] = []
    gpu: str | None = None
    migs: list[str] = []
    for line in listing.splitlines() + ["GPU end"]:
        head = re.match(r"\s*GPU (\S+?):?\s", line + " ")
        if head:
            if gpu is not None:
                devices += migs or [gpu]
            gpu, migs = head.group(1), []
            continue
        mig = re.search(r"\bMIG\b.*\(UUID:\s*(MIG-[^)\s]+)\)", line)
        if mig and gpu is not None:
            migs.append(mig.group(1))
    return devices


def plan_slots(devices: str, workers: int | None, threads: int | None = None,
               per_device: int | None = None) -> list[dict[str, str]]:
    """Environment of each worker slot: its ``CUDA_VISIBLE_DEVICES``, accelerator and thread count.

    GPU slots get the ``gpu`` accelerator, so a slot whose GPU is unusable fails instead of
    training on the CPU. ``per_device`` (default 1) workers share each GPU; it is refused
    when the plan has no GPU, rather than ignored, so a job script that expects packed GPUs
    learns at once that it got none. ``threads`` (torch threads per worker) defaults to
    the cores divided between the workers.
    """
    cores = os.cpu_count() or 1
    if threads is not None and threads < 1:
        raise WdstudyError(f"--threads={threads}: must be >= 1")
    if per_device is not None and per_device < 1:
        raise WdstudyError(f"--per-device={per_device}: must be >= 1 (workers per GPU)")
    ids = _gpu_ids(devices, workers)
    if ids is not None:
        k = per_device or 1
        n_threads = threads or max(1, cores // (len(ids) * k))
        # nvidia-smi numbers GPUs in PCI order; CUDA's default is fastest first: pin in nvidia-smi's order
        return [{"CUDA_VISIBLE_DEVICES": d, "WDSTUDY_THREADS": str(n_threads), "WDSTUDY_ACCELERATOR": "gpu",
                 "CUDA_DEVICE_ORDER": "PCI_BUS_ID"} for d in ids for _ in range(k)]
    if per_device is not None:
        why = "--workers asks for CPU workers" if workers is not None and devices == "auto" else \
            "no GPU is visible" if devices == "auto" else "--devices=cpu plans CPU workers"
        raise WdstudyError(f"--per-device={per_device}: applies to GPU workers only, and {why} "
                           "(use --workers N for CPU workers)")
    n = workers if workers is not None else cores
    if n < 1:
        raise WdstudyError(f"--workers={n}: must be >= 1")
    n_threads = threads or max(1, cores // n)
    return [{"CUDA_VISIBLE_DEVICES": "", "WDSTUDY_THREADS": str(n_threads), "WDSTUDY_ACCELERATOR": "cpu"}
            for _ in range(n)]


def _gpu_ids(devices: str, workers: int | None) -> list[str] | None:
    """The GPUs ``--devices`` plans workers on, pinned as ``CUDA_VISIBLE_DEVICES`` entries; None: CPU workers."""
    if devices == "auto":
        return (visible_gpus() if workers is None else []) or None
    if devices == "cpu":
        return None
    picked = [d.strip() for d in devices.split(",") if d.strip()]
    if not picked or len(set(picked)) != len(picked):
        raise WdstudyError(f"--devices={devices!r}: give 'auto', 'cpu' or distinct device ids like 0,1")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return picked
    # indexes into what the machine gave this job (SLURM, a scheduler)
    entries = _entries(visible)
    bad = [d for d in picked if not d.isdigit() or int(d) >= len(entries)]
    if bad:
        raise WdstudyError(f"--devices={devices!r}: {', '.join(bad)} is not an index into this job's "
                           f"CUDA_VISIBLE_DEVICES={visible!r} ({len(entries)} device(s))")
    return [entries[int(d)] for d in picked]


def format_plan(slots: list[dict[str, str]]) -> str:
    """One line per planned worker slot: its device pinning, threads and accelerator."""
    return "\n".join(
        f"slot {i}: CUDA_VISIBLE_DEVICES={s['CUDA_VISIBLE_DEVICES'] or '(none)'} threads={s['WDSTUDY_THREADS']} "
        f"accelerator={s.get('WDSTUDY_ACCELERATOR', 'auto')}" for i, s in enumerate(slots))


def why_cpu(devices: str, workers: int | None, slots: list[dict[str, str]]) -> str:
    """Why ``--devices auto`` planned CPU workers, when it did without being told to."""
    if devices != "auto" or workers is not None or slots[0].get("WDSTUDY_ACCELERATOR") != "cpu":
        return ""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return " (CPU workers: CUDA_VISIBLE_DEVICES names no GPU)"
    if shutil.which("nvidia-smi") is None:
        return " (CPU workers: no nvidia-smi on the PATH, so no GPU was looked for)"
    return " (CPU workers: nvidia-smi lists no GPU)"
