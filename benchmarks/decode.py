#!/usr/bin/env python3
"""Decoding throughput: a benchmark data set's image files into an empty decode cache.

    python benchmarks/decode.py [--dataset mnist] [--workers N]

Materialises the data set (train + test) as image files, then times imgcluster's find +
decode into a fresh cache, the way the first `imgcluster train` on a folder does, and writes
a JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from imgcluster.cache import load_images
from imgcluster.files import find_images

import common


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", default="mnist", choices=common.DATASETS)
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--data", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=common.default_work())
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    args = ap.parse_args()
    folders = common.materialise(args.dataset, args.data, args.work)
    cache = Path(tempfile.mkdtemp(prefix="imgcluster-decode-"))
    try:
        start = time.perf_counter()
        decoded = load_images(
            find_images([str(p) for p in folders.values()]), cache_dir=cache, workers=args.workers
        )
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    n = len(decoded.files)
    workers = args.workers or os.cpu_count()
    shape = "×".join(map(str, decoded.images.shape[1:]))
    record = {
        "kind": "decode",
        "dataset": args.dataset,
        "what": f"{args.dataset} files ({', '.join(folders)}) -> empty decode cache ({shape})",
        "images": n,
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 1),
        "commit": common.commit(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "stamp": common.stamp(),
        "command": common.command_line(),
        **common.machine(torch.device("cpu")),
    }
    print(f"{n} images in {seconds:.2f} s: {n / seconds:,.0f} images/s with {workers} workers")
    common.write_result(record, args.results, f"{record['stamp']}-decode-{args.dataset}")


if __name__ == "__main__":
    main()
