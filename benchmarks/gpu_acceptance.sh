#!/usr/bin/env bash
# The GPU acceptance run, in one command: bash benchmarks/gpu_acceptance.sh [--skip-throughput]
# On a machine without a usable CUDA device it says so and exits 0. See docs/how-to/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_acceptance.py "$@"
