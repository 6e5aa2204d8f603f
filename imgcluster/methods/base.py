"""The interface every clustering method implements, and its hyper-parameter handling.

A method is constructed with K and a config dataclass (defaults = the paper's),
validated up front, and ``fit`` turns the decoded uint8 images (N×C×H×W) into a
``ClusterModel``. Methods never see files, run folders or the command line.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from abc import ABC
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..engine import Checkpointer
from ..errors import UsageError
from ..model import ClusterModel
from ..report import Reporter, counted


@dataclass
class FitContext:
    """What a method may use besides the images: where, which seed, how to report, and
    the engine's settings (see ``imgcluster.engine.Trainer``)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    reporter: Reporter = field(default_factory=lambda: Reporter(quiet=True))
    log: Callable[[dict[str, Any]], None] = lambda record: None  # one train.log.jsonl line
    checkpoint: Checkpointer | None = None  # where checkpoints go (None: never saved)
    resume: bool = False  # continue from ``checkpoint``
    checkpoint_every: int = 0  # epochs between checkpoints; 0: at most every two minutes
    compile: bool = False  # torch.compile the networks
    # when the fit began (the context is made just before): log lines' ``elapsed`` counts
    # from here, so the first epoch's shows the set-up before it (CUDA start-up, uploads)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class FeatureFit:
    """What a method fitted on frozen backbone features returns: K centroids compared (by
    ``metric``) with the features, which are first square-rooted (sign kept) when
    ``signed_sqrt``, less ``centre`` when given, L2-normalised when ``normalize``, with a
    trailing 1 when ``append_one`` (a linear head's bias as the last centroid coordinate)."""

    centroids: torch.Tensor
    metric: str
    normalize: bool = True
    append_one: bool = False
    signed_sqrt: bool = False
    centre: torch.Tensor | None = None


class Method(ABC):
    """Base class: subclasses set ``name``, ``summary``, ``Config`` and implement ``fit``
    (pixels) and/or ``fit_features`` (pretrained features, ``--backbone``)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]
    pixels: ClassVar[bool] = True  # trains on decoded images (``--backbone none``)
    features: ClassVar[bool] = False  # clusters a backbone's features (``--backbone NAME``)
    trains: ClassVar[bool] = True  # trains with torch optimizers (``engine.warm_up``)

    def __init__(self, k: int, config: Any = None) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UsageError(f"k must be a whole number >= 1, got {k!r}")
        self.k = k
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"config must be a {self.Config.__name__}")
        validate = getattr(self.config, "validate", None)
        if validate is not None:
            validate()

    def mirror_features(self) -> bool:
        """Whether the backbone's features are averaged over each image and its mirror image
        (twice the extraction, in training and in ``assign``)."""
        return False

    def crop_features(self) -> bool:
        """Whether the features are also averaged over crops of the last block's input maps
        (``features.map_crops``; only where that block is known, about 25% more extraction)."""
        return False

    def check_count(self, n: int) -> None:
        """UsageError unless there are at least K images (or feature rows) to cluster."""
        if n < self.k:
            raise UsageError(
                f"{self.k} clusters asked for, but only {counted(n, 'image')} to cluster"
            )

    def fit(self, images: np.ndarray, ctx: FitContext) -> ClusterModel:
        """Train on ``images`` (uint8 N×C×H×W) and return the model."""
        raise UsageError(f"method {self.name} clusters pretrained features: pass --backbone")

    def fit_features(self, features: np.ndarray, ctx: FitContext) -> FeatureFit:
        """Cluster ``features`` (float32 N×D, a frozen backbone's pooled output)."""
        raise UsageError(
            f"method {self.name} trains its own network on the pixels; use --backbone none"
        )

    def tunes_tail(self, splittable: bool) -> bool:
        """Whether this fit trains the backbone's last block (``fit_tail``) rather than
        clustering its frozen features; ``splittable``: the backbone's last block is known
        (``backbones.split``). UsageError when the config asks for what the backbone can't."""
        return False

    def fit_tail(
        self, maps: np.ndarray, tail: nn.Module, ctx: FitContext
    ) -> tuple[FeatureFit, np.ndarray]:
        """Cluster with ``tail`` (the backbone's last block and pool, trained in place) on
        ``maps`` (float16 N×2×C×h×w: the input of that block for each image and its mirror);
        returns the fit and the tuned pooled features of the images (float32 N×D)."""
        raise NotImplementedError(f"method {self.name} does not train a backbone")

    @classmethod
    def check_input(cls, backbone: str) -> None:
        """UsageError unless this method can work on ``backbone``'s output ("none": pixels)."""
        if backbone == "none" and not cls.pixels:
            raise UsageError(f"method {cls.name} clusters pretrained features: pass --backbone")
        if backbone != "none" and not cls.features:
            feature_methods = ", ".join(m.name for m in _feature_methods())
            raise UsageError(
                f"method {cls.name} trains its own network on the pixels; with --backbone "
                f"use one of: {feature_methods}"
            )

    @classmethod
    def make_config(cls, overrides: Mapping[str, Any] | None = None) -> Any:
        """The default config with ``overrides`` applied; strings are converted to the
        field's type, unknown names and bad values raise UsageError."""
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls.Config)
        for key, raw in (overrides or {}).items():
            if key not in fields:
                raise UsageError(
                    f"method {cls.name} has no parameter {key!r}; "
                    f"its parameters are: {', '.join(fields)}"
                )
            values[key] = _coerce(key, raw, hints[key])
        return cls.Config(**values)


def _feature_methods() -> list[type[Method]]:
    from . import list_methods

    return [m for m in list_methods() if m.features]


def _coerce(key: str, raw: Any, kind: Any) -> Any:
    """Convert a command-line string (or a TOML value) to the annotated type."""
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        if raw not in typing.get_args(kind):
            choices = ", ".join(map(str, typing.get_args(kind)))
            raise UsageError(f"parameter {key} must be one of {choices}, got {raw!r}")
        return raw
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw in (None, "none", "None"):
            return None
        return _coerce(key, raw, options[0])
    try:
        if kind is bool:
            return _to_bool(raw)
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"parameter {key} must be a {kind.__name__}, got {raw!r}") from None


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
