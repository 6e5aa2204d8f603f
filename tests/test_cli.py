"""The command line: outputs, quiet mode and the documented exit codes (0, 1, 2)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imgcluster.cli import app

from conftest import make_bad_files

runner = CliRunner()


def run(*args: object, stdin: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], input=stdin)


@pytest.fixture
def trained(toy: Path, tmp_path: Path) -> Path:
    result = run("train", toy, "--k", 3, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def test_train_prints_a_summary(toy: Path, tmp_path: Path) -> None:
    result = run("train", toy, "--k", 3, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "run folder:" in result.stdout and "36 images clustered into 3 groups" in result.stdout
    assert "decoding" in result.stderr  # progress goes to stderr


def test_train_summary_counts_one_in_the_singular(toy: Path, tmp_path: Path) -> None:
    result = run("train", toy, "--k", 1, "--out", tmp_path / "r", "--no-sheets")
    assert result.exit_code == 0, result.output
    assert "36 images clustered into 1 group by kmeans" in result.stdout
    assert "0 files skipped" in result.stdout


def test_train_json_and_quiet(toy: Path, tmp_path: Path) -> None:
    result = run("train", toy, "-k", 3, "--out", tmp_path / "r", "--json", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    data = json.loads(result.stdout)
    assert data["images"] == 36 and sorted(data["sizes"]) == [12, 12, 12]


def test_full_cycle_through_the_cli(trained: Path, toy: Path, tmp_path: Path) -> None:
    ev = run("evaluate", trained / "labels.csv", "--json")
    assert ev.exit_code == 0 and json.loads(ev.stdout)["acc"] == 1.0
    table = run("evaluate", trained / "labels.csv")
    assert "ACC 1.0000" in table.stdout and "NMI 1.0000" in table.stdout
    assigned = run("assign", trained, toy, "--quiet")
    assert assigned.exit_code == 0
    rows = list(csv.DictReader(assigned.stdout.splitlines()))
    assert len(rows) == 36
    exported = run(
        "export", trained / "labels.csv", "--to", tmp_path / "sorted", "--format", "json"
    )
    assert exported.exit_code == 0, exported.output
    assert len(json.loads((tmp_path / "sorted" / "labels.json").read_text())) == 36


def test_train_again_in_the_photo_folder_sees_only_the_photos(toy: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"  # `cd photos; imgcluster train . ...` puts runs/ inside it
    shutil.copytree(toy, photos)
    first = run("train", photos, "-k", 3, "--runs-dir", photos / "runs", "--quiet")
    assert first.exit_code == 0, first.output
    labels = next((photos / "runs").glob("*/labels.csv"))
    assert run("export", labels, "--to", photos / "sorted", "--quiet").exit_code == 0
    again = run("train", photos, "-k", 3, "--runs-dir", photos / "runs", "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["images"] == 36  # not the contact sheets, not the copies
    assert sorted(Path(p).name for p in summary["left_out"]) == [labels.parent.name, "sorted"]
    assert "left out 2 folders imgcluster wrote" in again.stderr


def test_assign_reads_paths_from_stdin(trained: Path, toy: Path) -> None:
    paths = "\n".join(str(p) for p in sorted(toy.rglob("*.png"))[:5]) + "\n"
    result = run("assign", trained, "-", "--quiet", stdin=paths)
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader(result.stdout.splitlines()))) == 5


def test_assign_one_image_says_image(trained: Path, toy: Path) -> None:
    one = run("assign", trained, sorted(toy.rglob("*.png"))[0])
    assert one.exit_code == 0, one.output
    assert "1 image assigned, 0 skipped" in one.stderr


def test_methods_lists_every_method() -> None:
    result = run("methods")
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and {"kmeans", "depict", "aecm"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "{toy}", "--k", "0"],
        ["train", "{toy}", "--k", "3", "--method", "nope"],
        ["train", "{tmp}/missing", "--k", "3"],
        ["train", "{toy}", "--k", "1000"],
        ["train", "{toy}", "--k", "3", "--param", "nope=1"],
        ["train", "{toy}", "--k", "3", "--param", "epochs"],
        ["train", "{toy}", "--k", "3", "--image-size", "2"],
        ["train", "{toy}", "--k", "3", "--device", "tpu"],
        ["train", "{toy}"],  # missing --k: typer's own usage error
        ["evaluate", "{tmp}/missing.csv"],
        ["evaluate", "{tmp}/notes.csv"],
        ["evaluate", "{tmp}/notes.csv", "--truth", "{tmp}/missing.csv"],
        ["export", "{tmp}/notes.csv", "--to", "{tmp}/out"],
        ["assign", "{tmp}/norun", "{toy}"],
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], toy: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    result = run(*[a.format(toy=toy, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    if args != ["train", "{toy}"]:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and result.stderr.endswith(errors[0] + "\n")
        assert "Traceback" not in result.output


def test_epochs_for_a_method_counted_in_steps_names_what_to_set(toy: Path) -> None:
    result = run("train", toy, "--k", "3", "--method", "adc", "--epochs", "2")
    assert result.exit_code == 2
    assert "adc has no epochs setting; its length is --param steps=N" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_usage_error(toy: Path) -> None:
    result = run("train", toy, "--k", "3", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


def test_too_few_images_for_k_counts_one_in_the_singular(toy: Path, tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    shutil.copy(sorted(toy.rglob("*.png"))[0], tmp_path / "one")
    result = run("train", tmp_path / "one", "--k", 3)
    assert result.exit_code == 2
    assert "3 clusters asked for, but only 1 readable image to cluster" in result.stderr


def test_empty_folder_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("train", tmp_path / "empty", "--k", 2)
    assert result.exit_code == 2 and "no image files" in result.stderr


def test_existing_out_needs_force(trained: Path, toy: Path) -> None:
    result = run("train", toy, "--k", 3, "--out", trained, "-q")
    assert result.exit_code == 2 and "--force" in result.stderr
    assert run("train", toy, "--k", 3, "--out", trained, "-q", "--force").exit_code == 0


def test_unwritable_output_is_a_usage_error(toy: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("train", toy, "--k", 3, "--out", blocker / "run", "-q")
    assert result.exit_code == 2 and "cannot write" in result.stderr


def test_strict_exits_1_naming_the_file(toy: Path, tmp_path: Path) -> None:
    make_bad_files(toy / "junk")
    result = run("train", toy, "--k", 3, "--strict", "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("error: ") and "bomb.png" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written is left


def test_bad_files_warn_once_each_and_are_counted(toy: Path, tmp_path: Path) -> None:
    bad = make_bad_files(toy / "junk")
    result = run("train", toy, "--k", 3, "--out", tmp_path / "r")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == len(bad)
    assert f"{len(bad)} files skipped" in result.stdout


def test_debug_shows_the_traceback(toy: Path) -> None:
    result = run("train", toy, "--k", 0, "--debug")
    assert result.exit_code != 0 and result.exception is not None


def test_console_script_and_module_run(toy: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("imgcluster")
    env = dict(os.environ)
    ok = subprocess.run(
        [exe, "train", toy, "--k", "3", "--out", tmp_path / "r", "-q"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "imgcluster", "evaluate", tmp_path / "nope.csv"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("imgcluster ")
