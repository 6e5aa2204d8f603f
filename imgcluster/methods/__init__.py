"""The registry of clustering methods: names to classes, as timm does for models.

Add a method by writing one file here with a ``Method`` subclass decorated with
``@register`` and importing it below.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import FitContext, Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The class registered as ``name``; UsageError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_methods() -> list[type[Method]]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


from . import adc, aecm, depict, kmeans, mmdc, scan  # noqa: E402  (they register themselves)

__all__ = [
    "FitContext",
    "Method",
    "adc",
    "aecm",
    "depict",
    "get_method",
    "kmeans",
    "list_methods",
    "mmdc",
    "register",
    "scan",
]
