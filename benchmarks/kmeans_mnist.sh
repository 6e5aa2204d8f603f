#!/usr/bin/env bash
# The foundation check of issue 2, as a new user runs it: k-means on the MNIST test split
# (10,000 PNG files), three seeds, then assign and export --mode move on the same images.
#   bash benchmarks/kmeans_mnist.sh [WORKDIR]   (default /tmp/imgcluster-bench)
# Prints wall times and the evaluate output of each run. Needs ../shared/data, and python3 and
# imgcluster from the project's environment first on PATH (PATH=.venv/bin:$PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/imgcluster-bench}
ic=${IMGCLUSTER:-imgcluster}
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export IMGCLUSTER_CACHE="$work/cache"
python3 "$here/../shared/data/materialize.py" mnist "$work/mnist" --split test
echo "files: $(find mnist -type f | wc -l)"
for seed in 0 1 2; do
  start=$(date +%s%N)
  $ic train mnist --k 10 --method kmeans --seed "$seed" --quiet --out "runs/mnist-kmeans-seed$seed" >/dev/null
  echo "seed $seed: train wall $(( ($(date +%s%N) - start) / 1000000 )) ms" \
       "(decode cache $([ "$seed" = 0 ] && echo cold || echo warm))"
  $ic evaluate "runs/mnist-kmeans-seed$seed/labels.csv" | sed -n 1,2p
done
start=$(date +%s%N)
$ic assign runs/mnist-kmeans-seed0 mnist --quiet --out assigned.csv
echo "assign wall $(( ($(date +%s%N) - start) / 1000000 )) ms"
python3 - <<'PY'
import csv
a = {r["path"]: r["cluster"] for r in csv.DictReader(open("runs/mnist-kmeans-seed0/labels.csv"))}
b = {r["path"].removeprefix("mnist/"): r["cluster"] for r in csv.DictReader(open("assigned.csv"))}
print(f"assign agrees with training labels on {sum(a[k] == b.get(k) for k in a)} of {len(a)} images")
PY
$ic export runs/mnist-kmeans-seed0/labels.csv --to sorted --mode move --quiet
echo "after move: $(find mnist -type f | wc -l) files left in mnist/, $(find sorted -name '*.png' | wc -l) images in sorted/"
