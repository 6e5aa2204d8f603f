#!/usr/bin/env bash
# Every CPU figure in docs/benchmarks.md, re-run at the current commit (about 45 minutes on 2
# cores). Timing runs go first and alone; then accuracy. Results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py benchmarks/throughput.py --batch-size 512
$py benchmarks/decode.py --dataset mnist
$py benchmarks/decode_speed.py
$py benchmarks/big_folder.py
for d in mnist fashion_mnist usps usps_11k cifar10; do
  $py benchmarks/run.py --dataset "$d" --method kmeans --seeds 3
done
$py benchmarks/run.py --dataset mnist --method kmeans --seeds 3 --protocol test
for d in mnist fashion_mnist usps cifar10; do
  $py benchmarks/run.py --dataset "$d" --method kmeans --seeds 3 --k auto
done
$py benchmarks/report.py
