#!/usr/bin/env python3
"""Rebuild sample_images/ from Fashion-MNIST (MIT licence) in ../shared/data.

Five visually distinct classes, the first 40 test images of each, as 28×28 PNGs:

    python benchmarks/make_sample_images.py [--data ../shared/data] [--out sample_images]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {0: "tshirt", 1: "trouser", 7: "sneaker", 8: "bag", 9: "ankle_boot"}
PER_CLASS = 40


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_images"
    )
    args = ap.parse_args()
    data = np.load(args.data / "fashion_mnist.npz", allow_pickle=False)
    x, y = data["x_test"], data["y_test"]
    for label, name in CLASSES.items():
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(y == label)[:PER_CLASS]:
            Image.fromarray(x[index]).save(folder / f"fmnist-test-{index:05d}.png", optimize=True)


if __name__ == "__main__":
    main()
