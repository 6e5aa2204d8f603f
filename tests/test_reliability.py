"""Hostile folders, killed processes, concurrent runs and untrusted model files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from imgcluster import train
from imgcluster.cli import app
from imgcluster.errors import UsageError
from imgcluster.labels import read_labels
from imgcluster.model import ClusterModel
from imgcluster.report import show_path

from conftest import make_hostile_folder, make_toy_folder

runner = CliRunner()
EXE = [sys.executable, "-m", "imgcluster"]


def cli(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], dict[str, str]]:
    root = tmp_path_factory.mktemp("hostile") / "dump"
    good, bad = make_hostile_folder(root)
    return root, good, bad


def _warned(stderr: str, bad: dict[str, str]) -> None:
    """Every bad file is named exactly once in the warnings, with its reason."""
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == len(bad), warnings
    for rel, word in bad.items():
        hits = [w for w in warnings if w.split(": ", 2)[1].endswith(show_path(rel))]
        assert len(hits) == 1 and word in hits[0], (rel, hits)


def test_train_assign_export_over_a_hostile_folder(hostile, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, good, bad = hostile
    trained = cli("train", root, "--k", 3, "--out", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    _warned(trained.stderr, bad)
    assert f"{len(good)} images clustered" in trained.stdout
    assert f"{len(bad)} files skipped" in trained.stdout
    labels = read_labels(tmp_path / "run" / "labels.csv")
    assert set(labels.paths) == good
    assigned = cli("assign", tmp_path / "run", root, "--out", tmp_path / "a.csv")
    assert assigned.exit_code == 0
    _warned(assigned.stderr, bad)
    assert {str(Path(p).relative_to(root)) for p in read_labels(tmp_path / "a.csv").paths} == good
    exported = cli("export", tmp_path / "run" / "labels.csv", "--to", tmp_path / "sorted")
    assert exported.exit_code == 0, exported.output
    assert len([p for p in (tmp_path / "sorted").rglob("*") if p.is_file()]) == len(good) + 1


def test_strict_names_the_first_bad_file(hostile, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _, bad = hostile
    result = cli("train", root, "--k", 3, "--strict", "--out", tmp_path / "run")
    first = sorted(str(root / rel) for rel in bad)[0]
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(f"error: {show_path(first)}: ")
    assert not (tmp_path / "run").exists()
    trained = cli("train", root, "--k", 3, "--out", tmp_path / "ok", "-q")
    assert trained.exit_code == 0
    assigned = cli("assign", tmp_path / "ok", root, "--strict", "--out", tmp_path / "a.csv")
    named = assigned.stderr.splitlines()[-1]
    assert assigned.exit_code == 1 and named.endswith("stopped because of --strict")
    assert any(show_path(str(root / rel)) + ":" in named for rel in bad)
    assert not (tmp_path / "a.csv").exists()  # nothing half-written under the final name


def test_one_cluster_works(toy: Path, tmp_path: Path) -> None:
    result = train([toy], 1, out=tmp_path / "run")
    assert result.sizes == [36]
    labels = read_labels(tmp_path / "run" / "labels.csv")
    assert set(labels.cluster.tolist()) == {0} and (labels.confidence == 1).all()


# -- untrusted model files ----------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_named_like_a_model_is_never_run(toy: Path, tmp_path: Path) -> None:
    import pickle

    run = train([toy], 3, out=tmp_path / "run").run_dir
    marker = tmp_path / "pwned"
    (run / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UsageError, match="not a valid safetensors"):
        ClusterModel.load(run)
    result = cli("assign", run, toy)
    assert result.exit_code == 2 and "not a valid safetensors" in result.stderr
    assert not marker.exists()


def test_a_tampered_safetensors_header_is_rejected(toy: Path, tmp_path: Path) -> None:
    run = train([toy], 3, out=tmp_path / "run").run_dir
    blob = (run / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + size])
    for variant in ("dtype", "shape", "length"):
        h = json.loads(json.dumps(header))
        if variant == "dtype":
            h["centroids"]["dtype"] = "I64"
        elif variant == "shape":
            h["centroids"]["shape"] = [10**9, 10**9]
        raw = json.dumps(h).encode()
        head = struct.pack("<Q", 10**15 if variant == "length" else len(raw))
        (run / "model.safetensors").write_bytes(head + raw + blob[8 + size :])
        with pytest.raises(UsageError, match=r"model\.safetensors"):
            ClusterModel.load(run)
    (run / "model.json").write_text('{"format": "imgcluster-model", "format_version": 1}')
    with pytest.raises(UsageError, match="invalid or missing field"):
        ClusterModel.load(run)


# -- two processes, killed processes ------------------------------------------------------

SLOW_DEPICT = ["--method", "depict", "--param", "pretrain_epochs=200", "--param", "batch_size=8"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_second_process_on_the_same_run_is_refused(toy: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(
        [*EXE, "train", toy, "--k", "3", "--out", run, "-q", *SLOW_DEPICT],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(run / "config.toml", first)
        second = subprocess.run(
            [*EXE, "train", toy, "--k", "3", "--out", run, "--force", "-q"],
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2 and "in use by another imgcluster process" in second.stderr
        resumed = subprocess.run(
            [*EXE, "train", "--resume", run, "-q"], capture_output=True, text=True
        )
        assert resumed.returncode == 2 and f"pid {first.pid}" in resumed.stderr
    finally:
        first.kill()
        first.wait()
    # the lock dies with its process: the folder can be replaced now
    again = subprocess.run(
        [*EXE, "train", toy, "--k", "3", "--out", run, "--force", "-q"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr


def test_ctrl_c_in_a_real_process_checkpoints_and_resumes(toy: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *EXE,
            "train",
            toy,
            "--k",
            "3",
            "--out",
            run,
            "-q",
            *SLOW_DEPICT,
            "--checkpoint-every",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(run / "checkpoint.safetensors", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"continue with: imgcluster train --resume {run}" in err
    for cmd in (["assign", run, toy], ["evaluate", run], ["export", run, "--to", tmp_path / "x"]):
        used = subprocess.run([*EXE, *cmd], capture_output=True, text=True)
        assert used.returncode == 2 and "not a finished run folder" in used.stderr
        assert f"continue with: imgcluster train --resume {run}" in used.stderr
    done = _pretrain_epochs(run)
    resumed = subprocess.Popen(
        [*EXE, "train", "--resume", run, "-q"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while _pretrain_epochs(run) == done:  # wait for the resumed run to finish an epoch
        assert resumed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    resumed.send_signal(signal.SIGINT)  # and stop it again: the resumed run is resumable too
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 130 and "--resume" in err
    log = [json.loads(line) for line in (run / "train.log.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in log if r.get("phase") == "pretrain"]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > done  # continued


def _pretrain_epochs(run: Path) -> int:
    try:
        text = (run / "train.log.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if '"phase": "pretrain"' in line)


def _complete(run: Path) -> None:
    """Every file under a final name in the run folder is whole."""
    for path in run.iterdir():
        if path.name.startswith("."):
            continue  # temporary files of an interrupted write
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".csv":
            labels = read_labels(path)
            assert len(labels) > 0
        elif path.suffix == ".toml":
            import tomllib

            tomllib.loads(path.read_text())


def test_sigkill_during_train_never_leaves_a_half_written_file(toy: Path, tmp_path: Path) -> None:
    rnd = random.Random(0)
    caught = 0
    for i in range(5):
        run = tmp_path / f"run{i}"
        proc = subprocess.Popen(
            [
                *EXE,
                "train",
                toy,
                "--k",
                "3",
                "--out",
                run,
                "-q",
                "--method",
                "depict",
                "--param",
                "pretrain_epochs=3",
                "--param",
                "head_epochs=2",
                "--param",
                "epochs=3",
                "--param",
                "batch_size=4",
                "--checkpoint-every",
                "1",
            ],
            stderr=subprocess.DEVNULL,
        )
        # a random moment once training has started: the first epoch's checkpoint is there
        # (a fixed delay from launch missed training where starting Python and torch is slow)
        started = time.monotonic()
        while not (run / "checkpoint.safetensors").exists() and proc.poll() is None:
            if time.monotonic() - started > 120:
                break
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        if run.exists():
            _complete(run)
            caught += not (run / "labels.csv").exists()  # killed mid-run, not after it
    assert caught >= 2  # the kills really landed inside training


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}


def test_sigkill_during_export_move_keeps_every_image_exactly_once(tmp_path: Path) -> None:
    import shutil

    pristine = make_toy_folder(tmp_path / "pristine", per_class=700)
    for cls in pristine.iterdir():  # unique names, so a file is found by name wherever it is
        for p in cls.iterdir():
            p.rename(cls / f"{cls.name}-{p.name}")
    run = train([pristine], 3, out=tmp_path / "run").run_dir
    before = _digests(pristine)
    rnd = random.Random(1)
    midway = 0
    for i in range(5):
        source, target = tmp_path / f"src{i}", tmp_path / f"sorted{i}"
        shutil.copytree(pristine, source)
        command = [*EXE, "export", run / "labels.csv", "--root", source, "--to", target]
        command += ["--mode", "move", "-q"]
        proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not any(target.glob("cluster_*/*.png")):
            time.sleep(0.002)  # kill only once the moving has started...
        time.sleep(rnd.uniform(0, 0.1))  # ...somewhere inside it
        proc.kill()
        proc.wait()
        here = [*source.rglob("*.png"), *target.rglob("*.png")]
        assert sorted(p.name for p in here) == sorted(before), f"kill {i}: lost or doubled files"
        assert all(hashlib.sha256(p.read_bytes()).hexdigest() == before[p.name] for p in here)
        midway += 0 < len(list(source.rglob("*.png"))) < len(before)
        # the same command again finishes the job: every image moved once, labelled once
        again = subprocess.run(command, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert not list(source.rglob("*.png")) and _digests(target) == before
        sources = read_labels(target / "labels.csv").sources or []
        assert sorted(sources) == sorted(
            str(source / p.relative_to(pristine)) for p in pristine.rglob("*.png")
        )
    assert midway >= 2  # the kills really landed inside the export
