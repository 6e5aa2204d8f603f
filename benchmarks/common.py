"""What the benchmark scripts share: data sets as folders, machine facts, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"
DATASETS = ("mnist", "fashion_mnist", "usps", "usps_11k", "cifar10")
K = {name: 10 for name in DATASETS}


def default_work() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "imgcluster-bench")


def materialise(dataset: str, data: Path, work: Path) -> dict[str, Path]:
    """The data set as folders of image files (class folders), written once and reused.

    Returns {"train": folder, "test": folder} (usps_11k has only {"all": folder}).
    """
    if dataset not in DATASETS:
        raise SystemExit(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")
    root = work / "data" / dataset
    splits = ["all"] if dataset == "usps_11k" else ["train", "test"]
    folders = {s: root / s for s in splits}
    if (root / ".complete").exists():
        return folders
    script = data / "materialize.py"
    if dataset == "cifar10":  # one archive holding train/ and test/
        _run([sys.executable, str(script), dataset, str(root), "--split", "all"])
    else:
        for split, folder in folders.items():
            _run([sys.executable, str(script), dataset, str(folder), "--split", split])
    (root / ".complete").write_text("")
    return folders


def dev_split(folders: dict[str, Path], per_class: int, offset: int = 0) -> Path:
    """A development split: ``per_class`` files (by name, from the ``offset``-th) of each class
    folder of the train split, hard-linked (copied where links fail) into a sibling folder,
    made once. A second split at another offset checks that a choice made on the first holds."""
    if "train" not in folders:
        raise SystemExit("this data set has no train split to take a development split from")
    train = folders["train"]
    dev = train.parent / (f"dev-{per_class}" if offset == 0 else f"dev-{offset}-{per_class}")
    if (dev / ".complete").exists():
        return dev
    for cls in sorted(p for p in train.iterdir() if p.is_dir()):
        (dev / cls.name).mkdir(parents=True, exist_ok=True)
        for src in sorted(cls.iterdir())[offset : offset + per_class]:
            dst = dev / cls.name / src.name
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
    (dev / ".complete").write_text("")
    return dev


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    """The commit the code belongs to: ``IMGCLUSTER_COMMIT`` when set (the device machine gets
    the working tree with a stale ``.git``, so ``.commit`` carried with it says), else git's."""
    if os.environ.get("IMGCLUSTER_COMMIT", "unknown") != "unknown":
        return os.environ["IMGCLUSTER_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # only what decides results: edits to docs or notes do not make a run "dirty"
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "imgcluster",
                "benchmarks/*.py",
                "pyproject.toml",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("IMGCLUSTER_COMMIT", "unknown")
    return sha + ("+dirty" if dirty else "")


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process and its finished children (Linux: KB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def machine(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def write_result(record: dict[str, Any], folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def command_line() -> str:
    """How this script was called, with its path relative to the repository."""
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
