"""``train``: find images -> decode (cached) -> fit a method -> write the run folder."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import backbones, cache, features, files
from .autok import DEFAULT_RANGE, AutoK, choose_k
from .decode import DEFAULT_MAX_SIZE
from .device import resolve_device
from .engine import PRECISIONS, Checkpointer, flush_denormals, precision, warm_up
from .errors import Interrupted, UsageError
from .labels import Labels, write_labels, write_parquet
from .methods import FitContext, Method, get_method
from .model import ClusterModel, Preprocessing, versions
from .report import Reporter, counted, show_path
from .runs import RunFolder, continue_with, run_name
from .search import nearest
from .sheets import write_sheets


@dataclass
class TrainResult:
    """What a finished run produced; ``sizes[c]`` is the number of images in cluster c."""

    run_dir: Path
    method: str
    k: int
    images: int
    skipped: int
    sizes: list[int]
    device: str
    image_size: int
    channels: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # find, decode, fit, label, write
    auto_k: dict[str, Any] | None = None  # the K search, when --k auto
    left_out: list[str] = field(default_factory=list)  # runs/exports met in the input, unwalked


def train(
    inputs: Sequence[str | Path] | None = None,
    k: int | str | None = None,
    *,
    k_range: tuple[int, int] = DEFAULT_RANGE,
    method: str = "kmeans",
    backbone: str = "none",
    weights: Path | None = None,
    params: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    out: Path | None = None,
    runs_dir: Path = Path("runs"),
    seed: int = 0,
    device: str = "auto",
    image_size: int | None = None,
    force: bool = False,
    strict: bool = False,
    use_cache: bool = True,
    cache_dir: Path | None = None,
    workers: int | None = None,
    compile: bool = False,
    precision: str = "auto",
    checkpoint_every: int = 0,
    resume: Path | None = None,
    sheets: bool = True,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Cluster the images in ``inputs`` into ``k`` groups and write a run folder.

    ``k="auto"`` chooses K in ``k_range`` without labels first (see ``imgcluster.autok``).
    ``backbone`` other than "none" clusters that pretrained network's features (see
    ``imgcluster.backbones``; ``weights`` is a state-dict file for offline use).

    ``precision`` is the training arithmetic (see ``imgcluster.engine.precision``): ``auto``
    (bf16 autocast on a GPU, fp32 on the CPU), ``bf16`` or ``fp32``.

    With ``resume``, continue the unfinished run in that folder with the settings in its
    ``config.toml`` (``inputs``, ``k``, ``precision`` and the method settings are then taken
    from there).
    Parameters are checked before any work starts; see ``imgcluster train --help``.
    """
    reporter = reporter or Reporter(quiet=True)
    resumed = RunFolder.reopen(resume) if resume is not None else None  # locks it
    try:
        if resumed is not None:
            job, recorded = _resumed_job(resumed, device, compile, checkpoint_every)
        else:
            if not inputs or k is None:
                raise UsageError("name the images to cluster and --k, or --resume a run folder")
            job = _Job.new(
                inputs,
                k,
                method,
                params,
                epochs,
                batch_size,
                seed,
                device,
                image_size,
                strict,
                compile,
                checkpoint_every,
                k_range,
                backbone,
                weights,
                precision,
            )
        clock = _Clock()
        warming = warm_up(job.device, job.algo.trains)  # while the images decode
        found, decoded = _load(job, use_cache, cache_dir, workers, reporter, clock)
        warming.join()
        if resumed is not None:
            _check_same_images(recorded, decoded, resumed.path)
    except BaseException:
        if resumed is not None:
            resumed.release()  # a resume that fails here leaves its run folder as it was
        raise
    run = resumed or RunFolder.create(out, runs_dir, run_name(found.root, job.method), force)
    feature_cache = (cache_dir or cache.default_cache_dir()) if use_cache else None
    result = _fit_and_write(
        job, decoded, run, resumed is not None, sheets, reporter, clock, feature_cache
    )
    result.left_out = list(found.left_out)
    return result


def _resumed_job(
    run: RunFolder, device: str, compile: bool, checkpoint_every: int
) -> tuple[_Job, dict[str, Any]]:
    """The job recorded in an unfinished run folder, checked before any decoding, and the
    recorded config it came from."""
    if not Checkpointer(run.path).exists():
        raise UsageError(
            f"{show_path(run.path)}: no checkpoint to resume from "
            "(the run finished, or stopped before its first checkpoint)"
        )
    recorded = run.read_config()
    return _Job.from_config(recorded, device, compile, checkpoint_every), recorded


def _load(
    job: _Job,
    use_cache: bool,
    cache_dir: Path | None,
    workers: int | None,
    reporter: Reporter,
    clock: _Clock,
) -> tuple[files.ImageList, cache.Decoded]:
    """Find and decode the job's images (choosing K first with ``--k auto``)."""
    found = files.find_images(list(job.inputs))
    if note := found.left_out_note():
        reporter.note(note)
    clock.lap("find")
    decoded = cache.load_images(
        found,
        image_size=job.image_size,
        max_image_size=job.max_image_size(),
        use_cache=use_cache,
        cache_dir=cache_dir,
        workers=workers,
        strict=job.strict,
        reporter=reporter,
    )
    clock.lap("decode")
    if job.auto_range is not None:
        job.choose_k(decoded.images, reporter)
        clock.lap("choose_k")
    n = len(decoded.files)
    if n < job.k:
        raise UsageError(
            f"{job.k} clusters asked for, but only {counted(n, 'readable image')} to cluster"
        )
    return found, decoded


@dataclass
class _Job:
    """Everything that decides a run's result, resolved and validated."""

    inputs: list[str]
    k: int
    method: str
    algo: Method
    seed: int
    device: torch.device
    image_size: int | None
    strict: bool
    compile: bool
    checkpoint_every: int
    auto_range: tuple[int, int] | None = None  # choose K in this range first
    auto: AutoK | None = None
    backbone: str = "none"  # "none": the method trains on pixels
    weights: Path | None = None  # the backbone's weights file (None: its own source)
    precision: str = "auto"  # the training arithmetic (``engine.precision``)

    def __post_init__(self) -> None:
        # here, so that a value read back from a run's config.toml is checked before any work too
        if self.precision not in PRECISIONS:
            choices = ", ".join(PRECISIONS)
            raise UsageError(f"--precision must be one of {choices}, got {self.precision!r}")

    def max_image_size(self) -> int:
        """The largest automatic working size: the backbone's input size (smaller images are
        kept at their size and resized by the backbone), else the pixel methods' 64 px."""
        if self.backbone == "none":
            return DEFAULT_MAX_SIZE
        return backbones.input_size(self.backbone)

    def choose_k(self, images: np.ndarray, reporter: Reporter) -> None:
        assert self.auto_range is not None
        self.auto = choose_k(images, self.auto_range, self.seed, reporter)
        self.k = self.auto.k
        self.algo = type(self.algo)(self.k, self.algo.config)

    @classmethod
    def new(
        cls,
        inputs: Sequence[str | Path],
        k: int | str,
        method: str,
        params: Mapping[str, Any] | None,
        epochs: int | None,
        batch_size: int | None,
        seed: int,
        device: str,
        image_size: int | None,
        strict: bool,
        compile: bool,
        checkpoint_every: int,
        auto_range: tuple[int, int] = DEFAULT_RANGE,
        backbone: str = "none",
        weights: Path | None = None,
        precision: str = "auto",
    ) -> _Job:
        method_cls = get_method(method)
        _check_backbone(method_cls, backbone, weights)
        config = method_cls.make_config(_with_shortcuts(method_cls, params, epochs, batch_size))
        auto = k == "auto"
        if not auto and not isinstance(k, int):
            raise UsageError(f"--k must be a whole number >= 1 or 'auto', got {k!r}")
        algo = method_cls(2 if auto else k, config)  # checks the settings before any work
        if checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
        return cls(
            [str(p) for p in inputs],
            algo.k,
            method,
            algo,
            seed,
            resolve_device(device),
            image_size,
            strict,
            compile,
            checkpoint_every,
            auto_range if auto else None,
            backbone=backbone,
            weights=Path(weights).absolute() if weights is not None else None,
            precision=precision,
        )

    @classmethod
    def from_config(
        cls, cfg: dict[str, Any], device: str, compile: bool, checkpoint_every: int
    ) -> _Job:
        t = cfg["train"]
        method_cls = get_method(t["method"])
        algo = method_cls(int(t["k"]), method_cls.make_config(cfg.get("params", {})))
        backbone = str(t.get("backbone", "none"))
        weights = Path(t["weights"]) if t.get("weights") else None
        _check_backbone(method_cls, backbone, weights)
        return cls(
            list(t["inputs"]),
            int(t["k"]),
            t["method"],
            algo,
            int(t["seed"]),
            resolve_device(device),
            int(t["image_size"]),
            bool(t["strict"]),
            compile,
            checkpoint_every,
            backbone=backbone,
            weights=weights,
            precision=str(t.get("precision", "auto")),  # older runs: auto
        )


def _fit_and_write(
    job: _Job,
    decoded: cache.Decoded,
    run: RunFolder,
    resuming: bool,
    sheets: bool,
    reporter: Reporter,
    clock: _Clock,
    feature_cache: Path | None,
) -> TrainResult:
    """Fit, label and write the run folder; an interrupted or failed fit leaves the folder
    resumable when a checkpoint was written, and removes it otherwise."""
    checkpoint = Checkpointer(run.path)
    try:
        if not resuming:
            run.write_config(_settings(job, decoded))
        ctx = FitContext(
            job.device,
            job.seed,
            reporter,
            run.log,
            checkpoint,
            resuming,
            job.checkpoint_every,
            job.compile,
        )
        model, z = _fit(job, decoded, ctx, feature_cache, clock)
        sizes = _write(job, decoded, run, model, z, sheets, reporter, clock)
        checkpoint.remove()
        run.finish()
    except KeyboardInterrupt:
        if not checkpoint.exists():
            run.abandon()
            raise
        run.keep_partial()
        raise Interrupted(f"interrupted; {continue_with(run.path)}") from None
    except BaseException:
        if checkpoint.exists():
            run.keep_partial()  # resumable once the cause is fixed
        else:
            run.abandon()
        raise
    return TrainResult(
        run.path,
        job.method,
        job.k,
        len(decoded.files),
        len(decoded.skipped),
        sizes,
        str(job.device),
        decoded.image_size,
        decoded.channels,
        clock.total(),
        dict(clock.laps),
        job.auto.to_record() if job.auto else None,
    )


def _fit(
    job: _Job, decoded: cache.Decoded, ctx: FitContext, feature_cache: Path | None, clock: _Clock
) -> tuple[ClusterModel, torch.Tensor]:
    """The trained model and the embeddings of the training images, seeded by the job."""
    torch.manual_seed(job.seed)
    np.random.seed(job.seed % 2**32)
    flush_denormals()  # for this thread (the engine's import did it for the importing one)
    if job.backbone != "none":
        return _fit_features(job, decoded, ctx, feature_cache, clock)
    with precision(job.precision):
        model = job.algo.fit(decoded.images, ctx)
    clock.lap("fit")
    with ctx.reporter.task("labelling", total=len(decoded.files)) as bar:
        z = model.embed(decoded.images, device=job.device, on_batch=bar.advance)
    return model, z


def _write(
    job: _Job,
    decoded: cache.Decoded,
    run: RunFolder,
    model: ClusterModel,
    z: torch.Tensor,
    sheets: bool,
    reporter: Reporter,
    clock: _Clock,
) -> list[int]:
    """Label the training images and write the model, embeddings, labels (and contact
    sheets) into the run folder; returns the cluster sizes."""
    assignment = nearest(z, model.centroids, model.metric, device=job.device)
    clock.lap("label")
    model.save(run.path, {"seed": job.seed, "root": str(decoded.root)})
    run.write_embeddings(z.cpu().numpy())
    rels = [f.rel for f in decoded.files]
    write_labels(run.path / "labels.csv", rels, assignment)
    write_parquet(run.path / "labels.parquet", rels, assignment)  # when pyarrow is installed
    if sheets:
        labels = Labels(
            rels, assignment.cluster, assignment.confidence, assignment.distance, decoded.root
        )
        write_sheets(labels, run.path / "sheets", reporter=reporter)
    clock.lap("write")
    sizes = np.bincount(assignment.cluster, minlength=job.k).tolist()
    run.log(
        {
            "phase": "done",
            "images": len(decoded.files),
            "skipped": len(decoded.skipped),
            "sizes": sizes,
            "seconds": round(clock.total(), 3),
            "timings": clock.laps,
        }
    )
    return sizes


def _fit_features(
    job: _Job, decoded: cache.Decoded, ctx: FitContext, feature_cache: Path | None, clock: _Clock
) -> tuple[ClusterModel, torch.Tensor]:
    """Backbone features (cached) -> the method's centroids; the model embeds with the backbone,
    and the training images' embeddings come from the features already computed."""
    embedder = features.load_embedder(job.backbone, job.weights, job.device)
    weights_id = features.weights_id(job.weights)
    parts = backbones.split(embedder.net)
    if job.algo.tunes_tail(parts is not None):  # raises when asked for a tail there is not
        assert parts is not None
        trunk, tail = parts
        maps = features.cached_maps(
            embedder, trunk, weights_id, decoded, job.device, feature_cache, ctx.reporter
        )
        clock.lap("features")
        fit, feats = job.algo.fit_tail(maps, tail, ctx)
    else:
        embedder.mirror = job.algo.mirror_features()
        embedder.crops = job.algo.crop_features() and parts is not None
        if job.algo.crop_features() and parts is None:
            # the method asked for crops, but only a known last block can take them
            ctx.log({"phase": "features", "crops": f"none, {job.backbone} has no known tail"})
        feats = features.cached_features(
            embedder, weights_id, decoded, job.device, feature_cache, ctx.reporter
        )
        clock.lap("features")
        fit = job.algo.fit_features(feats, ctx)
    clock.lap("fit")
    embedder.set_transform(fit)
    z = embedder.finish(torch.from_numpy(feats).to(job.device))
    config = {**dataclasses.asdict(job.algo.config), "backbone": job.backbone}
    prep = Preprocessing(decoded.image_size, decoded.channels)
    model = ClusterModel(embedder, fit.centroids, fit.metric, prep, job.method, config)
    return model, z


def _check_backbone(method_cls: type[Method], backbone: str, weights: Path | None) -> None:
    if backbone != "none":
        backbones.check_name(backbone)
    method_cls.check_input(backbone)
    if weights is not None:
        if backbone == "none":
            raise UsageError("--weights is for a --backbone; this run has none")
        if not Path(weights).is_file():
            raise UsageError(f"{weights}: no such weights file")


def _check_same_images(recorded: dict[str, Any], decoded: cache.Decoded, path: Path) -> None:
    data = recorded.get("data", {})
    if data.get("images") != len(decoded.files) or data.get("channels") != decoded.channels:
        raise UsageError(
            f"{show_path(path)}: the images changed since this run started "
            f"({data.get('images')} then, {len(decoded.files)} now); start a new run"
        )


class _Clock:
    """Wall time per stage of ``train``."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def _with_shortcuts(
    method_cls: type, params: Mapping[str, Any] | None, epochs: int | None, batch_size: int | None
) -> dict[str, Any]:
    """``--epochs`` and ``--batch-size`` are shortcuts for the method parameters of those names."""
    merged = dict(params or {})
    names = {f.name for f in dataclasses.fields(method_cls.Config)}
    for key, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value is None:
            continue
        if key not in names:
            hint = _length_hint(key, names)
            raise UsageError(f"method {method_cls.name} has no {key} setting{hint}")
        merged[key] = value
    return merged


def _length_hint(key: str, names: set[str]) -> str:
    """A hint where the method counts its length in steps, not epochs (ADC)."""
    return "; its length is --param steps=N" if key == "epochs" and "steps" in names else ""


def _settings(job: _Job, decoded: cache.Decoded) -> dict[str, Any]:
    """Everything that decides the result, resolved, for config.toml."""
    return {
        "train": {
            "inputs": [str(Path(p).absolute()) for p in job.inputs],
            "k": job.k,
            "method": job.method,
            "seed": job.seed,
            "device": str(job.device),
            "image_size": decoded.image_size,
            "strict": job.strict,
            "backbone": job.backbone,
            "precision": job.precision,
            **({"weights": str(job.weights)} if job.weights is not None else {}),
        },
        "params": dataclasses.asdict(job.algo.config),
        "auto_k": job.auto.to_record() if job.auto else None,
        "data": {
            "root": str(decoded.root),
            "images": len(decoded.files),
            "skipped": len(decoded.skipped),
            "channels": decoded.channels,
        },
        "versions": versions(),
    }
