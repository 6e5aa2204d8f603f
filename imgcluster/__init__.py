"""imgcluster: sort folders of images into groups without labels.

The command line is a thin layer over these functions::

    from imgcluster import train, assign, evaluate, export
    run = train(["photos"], k=10)                      # -> TrainResult, run folder on disk
    assign(run.run_dir, ["new_photos"], out="new.csv")
    print(evaluate(run.run_dir / "labels.csv").acc)
    export(run.run_dir / "labels.csv", "sorted", mode="copy")

Importing the package is cheap; torch is loaded by the first call that needs it
(the decoding worker processes never load it).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "train": ("training", "train"),
    "assign": ("assignment", "assign"),
    "evaluate": ("evaluation", "evaluate"),
    "export": ("exporting", "export"),
    "find_images": ("files", "find_images"),
    "load_images": ("cache", "load_images"),
    "ClusterModel": ("model", "ClusterModel"),
    "get_method": ("methods", "get_method"),
    "list_methods": ("methods", "list_methods"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'imgcluster' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
