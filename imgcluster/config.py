"""``--config FILE.toml``: option values for any command, read from a TOML file.

The file holds either a table named after the command (``[train]``, ``[assign]``...) or plain
top-level keys; option names as on the command line, with ``-`` or ``_``. A run's own
``config.toml`` is such a file: ``imgcluster train --config runs/x/config.toml`` replays the
run (its ``inputs`` become the images, its ``[params]`` the ``--param`` values), and with the
same seed on the same device gives the same labels. Options given on the command line win.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import UsageError
from .report import show_path

_ALIASES = {"inputs": "images"}
_IGNORED = {"data", "versions"}  # facts a run records about itself, not settings


def option_defaults(path: Path, command: str, names: dict[str, str]) -> dict[str, Any]:
    """Values for ``command``'s options from the TOML file at ``path``, keyed by parameter
    name; ``names`` maps every accepted key (flag or parameter name) to its parameter."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{show_path(path)}: config file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{show_path(path)}: not a valid TOML file ({exc})") from None
    table = doc.get(command) if isinstance(doc.get(command), dict) else doc
    values: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) or key in _IGNORED:
            continue
        name = _ALIASES.get(key, key).replace("-", "_")
        if name not in names:
            raise UsageError(f"{show_path(path)}: {command} has no option {key!r}")
        values[names[name]] = value
    params = doc.get("params") if command == "train" else None
    if isinstance(params, dict) and "param" in names:
        values["param"] = [f"{k}={_toml_value(v)}" for k, v in params.items()]
    return values


def _toml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
