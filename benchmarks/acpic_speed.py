#!/usr/bin/env python3
"""AC-PIC's wall time: the initial clustering of DEPICT and AE-CM, timed alone.

    python benchmarks/acpic_speed.py [--dataset mnist] [--run RUN | --codes F.npy | --dims 10]

What is clustered: with ``--run``, the data set's images (train + test) embedded by that run
folder's model, e.g. the final codes of an AE-CM run, the kind of codes AC-PIC meets inside
DEPICT and AE-CM; with ``--codes``, an N × D .npy array; otherwise the pixels projected by PCA
onto ``--dims`` components, which needs no trained model but is much harder for AC-PIC than
learned codes (its clusters overlap, so merges have more neighbours). The first call includes
numba's compilation unless an earlier run cached it; the second call is the steady-state
time. One JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numba
import numpy as np
import torch
from sklearn.decomposition import PCA

from imgcluster.methods.acpic import acpic
from imgcluster.model import ClusterModel

import common


def pca_codes(images: np.ndarray, dims: int) -> np.ndarray:
    """Pixels in [0, 1], flattened, projected onto ``dims`` principal axes."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return PCA(dims, random_state=0).fit_transform(flat)


def pixels(dataset: str, data: Path) -> np.ndarray:
    """Train + test images, uint8 N × C × H × W."""
    with np.load(data / f"{dataset}.npz") as arrays:
        keys = ["x"] if "x" in arrays else ["x_train", "x_test"]
        x = np.concatenate([arrays[k] for k in keys])
    return x[:, None] if x.ndim == 3 else x


def run_codes(run: Path, images: np.ndarray) -> np.ndarray:
    """The images embedded by the model of a run folder."""
    return ClusterModel.load(run).embed(images).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--dataset", default="mnist", choices=[d for d in common.DATASETS if d != "cifar10"]
    )
    ap.add_argument("--dims", type=int, default=10, help="PCA components (the codes' size)")
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--run", type=Path, help="a run folder whose model embeds the images")
    ap.add_argument("--codes", type=Path, help="an N × D .npy array to cluster instead")
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    ap.add_argument("--data", type=Path, default=common.DEFAULT_DATA)
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    if args.codes:
        codes, what = np.load(args.codes), args.codes.name
    elif args.run:
        codes = run_codes(args.run, pixels(args.dataset, args.data))
        what = f"{args.dataset} codes of {args.run.name}"
    else:
        codes = pca_codes(pixels(args.dataset, args.data), args.dims)
        what = f"{args.dataset} PCA-{args.dims}"
    seconds = []
    for _ in range(2):  # the first may compile; the second is the steady state
        start = time.perf_counter()
        timings: dict[str, object] = {}
        labels = acpic(codes, args.clusters, timings=timings)
        seconds.append(time.perf_counter() - start)
    record = {
        "kind": "acpic",
        "what": f"{what} ({codes.shape[0]:,} × {codes.shape[1]}) codes -> {args.clusters} clusters",
        "images": int(codes.shape[0]),
        "threads": numba.get_num_threads(),
        "first_seconds": round(seconds[0], 2),
        "seconds": round(seconds[1], 2),
        **timings,  # the second call's: the K-NN graph and the merges
        "sizes": np.bincount(labels, minlength=args.clusters).tolist(),
        "commit": common.commit(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "stamp": common.stamp(),
        "command": common.command_line(),
        **common.machine(torch.device("cpu")),
    }
    print(
        f"{record['what']}: {record['seconds']:.1f} s ({record['first_seconds']:.1f} s the first"
        f" time) on {record['threads']} threads"
    )
    name = f"{record['stamp']}-acpic-{codes.shape[0]}-t{record['threads']}"
    common.write_result(record, args.results, name)


if __name__ == "__main__":
    main()
