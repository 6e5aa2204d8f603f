#!/usr/bin/env bash
# Run one benchmark script on a bare GPU machine with no network, from the repository root:
#
#   bash benchmarks/device.sh OUTDIR SCRIPT [ARGS...]
#   e.g. bash benchmarks/device.sh "$OUT" run.py --dataset cifar10 --method mmdc --seeds 1 --device cuda
#
# Expects beside the code (ignored by git, carried to the machine):
#   .whl/   wheels for what the machine lacks: faiss-cpu and tomli-w for its Python (see
#           benchmarks/README.md for the pip download line)
#   .data/  the files of ../shared/data the run needs (materialize.py + e.g. mnist.npz or
#           cifar10-jpeg.tar.xz)
# Installs the wheels into /tmp/site, runs SCRIPT with the results folder set to OUTDIR, and
# leaves the result JSON files there.
set -euo pipefail
out=${1:?usage: bash benchmarks/device.sh OUTDIR SCRIPT [ARGS...]}
script=${2:?usage: bash benchmarks/device.sh OUTDIR SCRIPT [ARGS...]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
data_args=()
case "$script" in run.py|decode.py) data_args=(--data .data --work /tmp/imgcluster-bench) ;; esac
python3 "benchmarks/$script" "$@" "${data_args[@]}" --results "$out"
