#!/usr/bin/env python3
"""Memory of scanning and assigning a big folder: peak RSS at several folder sizes.

    python benchmarks/big_folder.py [--sizes 20000 100000 200000] [--work DIR]

Writes N small PNG files (16×16 grey, 100 per folder), trains k-means on the first 2,000, then
runs `imgcluster assign RUN FOLDER --out labels.csv` as a separate process per size and records
its peak resident memory (and that of its decoding workers) and wall time. Flat memory means
the peak does not grow with N. One JSON per size goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common


def make_folder(root: Path, n: int) -> None:
    """n files under root/dNNNN/, reusing what an earlier call wrote."""
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(64)]
    for i in range(n):
        path = root / f"d{i // 100:05d}" / f"{i:07d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tiles[i % 64].save(path)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    ap.add_argument("--work", type=Path, default=common.default_work() / "big")
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    args = ap.parse_args()
    run = args.work / "run"
    for n in sorted(args.sizes):
        folder = args.work / f"n{n}"
        make_folder(folder, n)
        if not (run / "model.json").exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "imgcluster",
                    "train",
                    *sorted(map(str, folder.glob("d0000*"))),
                    "--k",
                    "10",
                    "--out",
                    str(run),
                    "--force",
                    "-q",
                ],
                check=True,
            )
        cmd = [
            sys.executable,
            "-m",
            "imgcluster",
            "assign",
            str(run),
            str(folder),
            "--out",
            str(args.work / f"labels-{n}.csv"),
            "-q",
            "--device",
            "cpu",
        ]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak (and its workers')
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"assign failed with exit code {proc.returncode}")
        peak = usage.ru_maxrss
        record = {
            "kind": "memory",
            "what": f"imgcluster assign over {n:,} PNG files (16×16)",
            "images": n,
            "seconds": round(seconds, 2),
            "images_per_s": round(n / seconds, 1),
            "peak_rss_mb": round(peak / 1024, 1),
            "commit": common.commit(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "stamp": common.stamp(),
            "command": common.command_line(),
            **common.machine(torch.device("cpu")),
        }
        print(f"{n:,} files: {seconds:.1f} s, peak RSS {record['peak_rss_mb']} MB")
        common.write_result(record, args.results, f"{record['stamp']}-memory-{n}")


if __name__ == "__main__":
    main()
