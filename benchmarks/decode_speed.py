#!/usr/bin/env python3
"""Time imgcluster's decoding of one large JPEG, with and without reduced-scale (draft) decoding.

    python benchmarks/decode_speed.py [--megapixels 12] [--size 64] [--repeat 20]

Writes a synthetic photo-like JPEG (smooth gradients + noise, quality 90) to a temporary folder
and reports the median time of ``imgcluster.decode.decode`` against the same decode with
Pillow's draft mode switched off.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

from imgcluster.decode import decode

import common


def photo(megapixels: float, seed: int = 0) -> Image.Image:
    w = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = int(w * 3 / 4)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 200
    return Image.fromarray((base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8))


def median_ms(path: str, size: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        decode(path, size, 3)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--megapixels", type=float, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp, "photo.jpg"))
        im = photo(args.megapixels)
        im.save(path, quality=90)
        megabytes = Path(path).stat().st_size / 1e6
        print(f"{im.width}x{im.height} JPEG, {megabytes:.1f} MB -> {args.size} px")
        fast = median_ms(path, args.size, args.repeat)
        original = JpegImagePlugin.JpegImageFile.draft
        JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None  # type: ignore[method-assign]
        try:
            slow = median_ms(path, args.size, args.repeat)
        finally:
            JpegImagePlugin.JpegImageFile.draft = original  # type: ignore[method-assign]
        print(f"with draft mode: {fast:.1f} ms; full decode: {slow:.1f} ms ({slow / fast:.1f}x)")
    record = {
        "kind": "jpeg-decode",
        "what": f"{im.width}×{im.height} JPEG -> {args.size} px RGB, median of {args.repeat}: "
        f"{fast:.1f} ms with draft mode, {slow:.1f} ms full decode ({slow / fast:.1f}×)",
        "images": args.repeat,
        "workers": 1,
        "seconds": round(fast * args.repeat / 1000, 3),
        "images_per_s": round(1000 / fast, 1),
        "draft_ms": round(fast, 2),
        "full_ms": round(slow, 2),
        "commit": common.commit(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "stamp": common.stamp(),
        "command": common.command_line(),
        **common.machine(torch.device("cpu")),
    }
    common.write_result(record, args.results, f"{record['stamp']}-jpeg-decode")


if __name__ == "__main__":
    main()
