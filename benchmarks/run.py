#!/usr/bin/env python3
"""Run a method on a benchmark data set the way a user's `imgcluster train` does, and score it.

    python benchmarks/run.py --dataset mnist --method kmeans --seeds 3 [--device cuda]

The data set is written once as folders of image files (class folders; cached under
~/.cache/imgcluster-bench or --work), trained on with imgcluster.train (a fresh decode cache
per invocation, so the first seed's decode time is a cold one), and scored with
imgcluster.evaluate against the folder names. The protocol is the paper's: train and score on
train+test pooled (DEPICT, MMDC, AE-CM, and the k-means baseline), or train on the train split
and score the test split with imgcluster.assign (ADC); --protocol overrides it, `test`
trains and scores on the test split alone, and `dev` on a development split: the first
--dev-per-class images (by name) of each class of the train split (after --dev-offset of them:
a second split, recorded as protocol `dev@OFFSET`), where defaults are chosen without touching
the test split.

One JSON per seed goes to benchmarks/results/ (or --results): ACC, NMI, ARI, the wall time of
decode / train / assign, training images/s, peak GPU and host memory, the device, the commit
and this command. `python benchmarks/report.py` turns them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from imgcluster import assign, evaluate, train
from imgcluster.device import resolve_device
from imgcluster.engine import CHECKPOINT, PRECISIONS
from imgcluster.errors import Interrupted
from imgcluster.report import Reporter

import common

PAPER_PROTOCOL = {"adc": "split"}  # everything else: train+test pooled


def main() -> None:
    args = _parse()
    device = resolve_device(args.device)
    folders = common.materialise(args.dataset, args.data, args.work)
    protocol = args.protocol or PAPER_PROTOCOL.get(args.method, "pooled")
    if protocol == "dev":
        folders = {"dev": common.dev_split(folders, args.dev_per_class, args.dev_offset)}
    train_on, score_on = _splits(folders, protocol)
    if protocol == "dev" and args.dev_offset:
        protocol = f"dev@{args.dev_offset}"  # its own rows in the results and the report
    params = dict(p.split("=", 1) for p in args.param)
    batch = f"{common.stamp()}-{args.dataset}-{_tag(args)}"
    # a fresh cache per invocation (the first seed's decode is a cold one) unless --cache names
    # one to share, e.g. backbone features between a kmeans and a scan invocation
    cache = args.cache or Path(tempfile.mkdtemp(prefix="imgcluster-bench-cache-"))
    scores = []
    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            record = _one_run(args, device, protocol, train_on, score_on, params, seed, cache)
            record.update(batch=batch, kind="run", command=common.command_line())
            common.write_result(record, args.results, f"{batch}-{device.type}-s{seed}")
            scores.append(record["acc"])
            print(
                f"seed {seed}: ACC {record['acc']:.4f} NMI {record['nmi']:.4f} "
                f"ARI {record['ari']:.4f} in {record['seconds']['total']:.1f} s; "
                f"{len(record['cluster_sizes'])} of {record['k']} clusters filled"
            )
    except Interrupted:
        raise SystemExit(
            "stopped part-way: run the same command with --resume to continue"
        ) from None
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    if len(scores) > 1:
        mean, std = statistics.mean(scores), statistics.stdev(scores)
        print(f"ACC {mean:.4f} ± {std:.4f} over {len(scores)} seeds")


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", required=True, choices=common.DATASETS)
    ap.add_argument("--method", required=True)
    ap.add_argument("--backbone", default="none", help="pretrained features (see imgcluster)")
    ap.add_argument("--weights", type=Path, help="the backbone's weights file")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--k", default=None, help="clusters: the true K (default) or auto")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--protocol", choices=["pooled", "split", "test", "dev"])
    ap.add_argument(
        "--dev-per-class", type=int, default=1000, help="images a class, --protocol dev"
    )
    ap.add_argument(
        "--dev-offset",
        type=int,
        default=0,
        help="--protocol dev: skip this many images a class first (a second split)",
    )
    ap.add_argument("--param", action="append", default=[], help="method KEY=VALUE (repeatable)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--data", type=Path, default=common.DEFAULT_DATA, help="the shared data folder")
    ap.add_argument(
        "--work", type=Path, default=common.default_work(), help="materialised data, runs"
    )
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    ap.add_argument("--cache", type=Path, help="decode/feature cache to keep and share")
    ap.add_argument("--verbose", action="store_true", help="progress bars on stderr")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue a seed's run stopped part-way (long CPU runs spread over several "
        "sittings, a GPU run over several calls); its times then come from the training log",
    )
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        help="checkpoint every N epochs (default: 1 with --resume; otherwise, and with 0, at "
        "most every 2 minutes, and when stopped by Ctrl-C or SIGINT)",
    )
    args = ap.parse_args()
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        ap.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    return args


def _tag(args: argparse.Namespace) -> str:
    """The method, with its backbone when there is one and a precision other than auto, as a
    file-name part (so that ``--resume`` never continues a run of other arithmetic)."""
    tag = args.method if args.backbone == "none" else f"{args.method}+{args.backbone}"
    if args.precision != "auto":
        tag += f"-{args.precision}"
    return tag.replace(":", "-")


def _settings(args: argparse.Namespace, params: dict[str, str]) -> str:
    """A run-folder name part for settings other than the defaults: a hash of the method
    parameters, epochs, batch size, K (and the dev split's size), so that ``--resume`` never
    continues a run made with other settings, nor two such runs share a folder."""
    given = params | _shortcuts(args)
    given.pop("compile", None)  # the same arithmetic, compiled or not
    given.pop("precision", None)  # already in _tag
    if args.protocol == "dev":
        given["dev_per_class"] = args.dev_per_class
    if not given:
        return ""
    return "-" + hashlib.sha1(json.dumps(given, sort_keys=True).encode()).hexdigest()[:8]


def _splits(folders: dict[str, Path], protocol: str) -> tuple[list[Path], list[Path] | None]:
    """(train on, score on): score_on None means score the training labels themselves."""
    if "all" in folders:  # usps_11k: one pool only
        if protocol == "split":
            raise SystemExit("usps_11k has no train/test split")
        return [folders["all"]], None
    if protocol == "dev":
        return [folders["dev"]], None
    if protocol == "pooled":
        return [folders["train"], folders["test"]], None
    if protocol == "test":
        return [folders["test"]], None
    return [folders["train"]], [folders["test"]]


def _checkpoint_every(args: argparse.Namespace) -> int:
    """Epochs between checkpoints: each epoch for a resumable run unless told otherwise (a
    checkpoint of MMDC's ResNet-18 costs 0.1-0.6 s, up to a sixth of its GPU epoch); 0 = the
    trainer's own, at most every 2 minutes and on a SIGINT, at the next step."""
    if args.checkpoint_every is not None:
        return args.checkpoint_every
    return 1 if args.resume else 0


def _one_run(
    args: argparse.Namespace,
    device: torch.device,
    protocol: str,
    train_on: list[Path],
    score_on: list[Path] | None,
    params: dict[str, str],
    seed: int,
    cache: Path,
) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reporter = Reporter(quiet=not args.verbose)
    out = (
        args.work
        / "runs"
        / f"{args.dataset}-{_tag(args)}{_settings(args, params)}-{protocol}-s{seed}"
    )
    started = time.perf_counter()
    auto = args.k == "auto"
    resumed = args.resume and (out / CHECKPOINT).is_file()
    common_args = dict(
        device=str(device),
        cache_dir=cache,
        compile=args.compile,
        precision=args.precision,
        checkpoint_every=_checkpoint_every(args),
        reporter=reporter,
    )
    if resumed:
        print(f"seed {seed}: resuming {out}")
        result = train(resume=out, **common_args)
    else:
        result = train(
            [str(p) for p in train_on],
            "auto" if auto else int(args.k or common.K[args.dataset]),
            method=args.method,
            backbone=args.backbone,
            weights=args.weights,
            params=params,
            epochs=args.epochs,
            batch_size=args.batch_size,
            out=out,
            force=True,
            seed=seed,
            **common_args,
        )
    assign_s = result.timings["label"]
    labels = result.run_dir / "labels.csv"
    if score_on is not None:
        labels = result.run_dir / "test-labels.csv"
        t0 = time.perf_counter()
        assign(
            result.run_dir,
            [str(p) for p in score_on],
            out=labels,
            device=str(device),
            reporter=reporter,
        )
        assign_s += time.perf_counter() - t0
    ev = evaluate(labels, truth="folders")
    decode_s = round(result.timings["find"] + result.timings["decode"], 3)
    # a resumed run's wall time covers only its last sitting: add up the logged phases instead
    train_s = _logged_seconds(result.run_dir) if resumed else result.timings["fit"]
    total_s = decode_s + train_s + assign_s if resumed else time.perf_counter() - started
    return {
        "dataset": args.dataset,
        "method": args.method,
        "backbone": args.backbone,
        "protocol": protocol,
        "seed": seed,
        "k": result.k,
        "true_k": common.K[args.dataset],
        "params": params | _shortcuts(args),
        "train_images": result.images,
        "scored_images": ev.scored,
        "acc": ev.acc,
        "nmi": ev.nmi,
        "ari": ev.ari,
        # how the labels fill the clusters, without looking at the truth: a method that leaves
        # clusters empty shows it here whatever its ACC
        "cluster_sizes": sorted(ev.sizes.values(), reverse=True),
        "seconds": {
            "decode": decode_s,
            "features": result.timings.get("features"),
            "train": train_s,
            "assign": round(assign_s, 3),
            "total": round(total_s, 3),
        },
        "resumed": resumed,
        "decode_cache": "cold" if seed == args.first_seed and args.cache is None else "warm",
        "train_images_per_s": _images_per_s(result.run_dir, result.images, result.timings["fit"]),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if device.type == "cuda"
        else None,
        "peak_host_mb": common.peak_host_memory_mb(),
        "image_size": result.image_size,
        "channels": result.channels,
        "commit": common.commit(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **common.machine(device),
    }


def _shortcuts(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "compile": args.compile or None,
        "precision": None if args.precision == "auto" else args.precision,
        "k": args.k,
    }
    return {k: v for k, v in given.items() if v is not None}


def _logged_seconds(run_dir: Path) -> float:
    """The training time written in the run's log: every epoch and step of every sitting."""
    records = [json.loads(line) for line in (run_dir / "train.log.jsonl").read_text().splitlines()]
    return round(sum(r.get("seconds") or 0 for r in records if r.get("phase") != "done"), 3)


def _images_per_s(run_dir: Path, images: int, fit_s: float) -> float:
    """Mean training throughput of the logged epochs; images / fit time when none is logged."""
    rates = []
    for line in (run_dir / "train.log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "images_per_s" in record:
            rates.append(record["images_per_s"])
    return round(statistics.mean(rates) if rates else images / max(fit_s, 1e-9), 1)


if __name__ == "__main__":
    main()
