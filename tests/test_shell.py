"""Shell friendliness: --config replays, --json everywhere, completion, parquet output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgcluster.cli import app

runner = CliRunner()


def run(*args: object, stdin: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], input=stdin)


@pytest.fixture
def trained(toy: Path, tmp_path: Path) -> Path:
    result = run(
        "train",
        toy,
        "--k",
        3,
        "--out",
        tmp_path / "run",
        "--seed",
        4,
        "-q",
        "--param",
        "restarts=2",
        "--no-sheets",
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def test_a_runs_config_replays_it(trained: Path, tmp_path: Path) -> None:
    again = run("train", "--config", trained / "config.toml", "--out", tmp_path / "again", "-q")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "labels.csv").read_text() == (trained / "labels.csv").read_text()
    replayed = (tmp_path / "again" / "config.toml").read_text()
    assert "seed = 4" in replayed and "restarts = 2" in replayed


def test_config_files_for_any_command_and_the_command_line_wins(
    trained: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "evaluate.toml"
    cfg.write_text('[evaluate]\ntruth = "none"\njson = true\n')
    result = run("evaluate", trained / "labels.csv", "--config", cfg)
    assert result.exit_code == 0 and json.loads(result.stdout)["acc"] is None
    flat = tmp_path / "flat.toml"
    flat.write_text('truth = "none"\n')
    result = run(
        "evaluate", trained / "labels.csv", "--config", flat, "--truth", "folders", "--json"
    )
    assert json.loads(result.stdout)["acc"] == 1.0
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 3\n")
    result = run("evaluate", trained / "labels.csv", "--config", bad)
    assert result.exit_code == 2 and "has no option 'colour'" in result.stderr
    assert (
        run("evaluate", trained / "labels.csv", "--config", tmp_path / "none.toml").exit_code == 2
    )


def test_json_on_every_command_that_prints_results(
    trained: Path, toy: Path, tmp_path: Path
) -> None:
    lines = run("assign", trained, toy, "--json", "-q").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 36 and set(rows[0]) == {"path", "cluster", "confidence", "distance"}
    exported = json.loads(
        run("export", trained / "labels.csv", "--to", tmp_path / "s", "--json").stdout
    )
    assert exported["exported"] == 36 and exported["skipped"] == []
    methods = json.loads(run("methods", "--json").stdout)["methods"]
    kmeans = next(m for m in methods if m["name"] == "kmeans")
    assert kmeans["parameters"]["restarts"] == 3
    report = json.loads(run("report", trained, "--json", "-q").stdout)
    assert Path(report["report"]).is_file()


def test_batch_job_reading_paths_from_stdin(trained: Path, toy: Path) -> None:
    paths = "".join(f"{p}\n" for p in sorted(toy.rglob("*.png")))  # as `find ... |` would give
    result = run("assign", trained, "-", "-q", stdin=paths)
    assert len(list(csv.DictReader(result.stdout.splitlines()))) == 36


def test_shell_completion_is_offered() -> None:
    assert "--install-completion" in run("--help").stdout


def test_labels_parquet_when_pyarrow_is_installed(trained: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(trained / "labels.parquet")
    assert table.column_names == ["path", "cluster", "confidence", "distance"]
    with open(trained / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    assert table.column("cluster").to_pylist() == [int(r["cluster"]) for r in rows]
