# Sourced by device.sh and gpu_check.sh, from the repository root on the bare GPU machine:
# the carried wheels (.whl/) installed into /tmp/site, the checkout importable, the commit the
# numbers belong to (.commit) exported for benchmarks/common.py.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export IMGCLUSTER_COMMIT="${IMGCLUSTER_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}"
