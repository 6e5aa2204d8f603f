"""The repository's promises that tests can hold it to."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_ci_runs_the_readme_test_command() -> None:
    commands = _quick_start()
    assert len(commands) == 2
    assert "train sample_images" in commands[0]
    # the README's command, word for word, and its failure fails CI
    assert f"{commands[1]} || exit 1" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_nothing_unpickles() -> None:
    for path in (ROOT / "imgcluster").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_sample_images_are_there_with_their_licence() -> None:
    images = list((ROOT / "sample_images").rglob("*.png"))
    assert 100 <= len(images) <= 300
    assert "MIT" in (ROOT / "sample_images" / "README.md").read_text()


def _case_labels(script: str) -> set[str]:
    """The modes a benchmarks shell script's ``case "$issue"`` knows (``*`` left out)."""
    text = (ROOT / "benchmarks" / script).read_text()
    labels = re.findall(r"^  ([\w|-]+)\)", text, flags=re.MULTILINE)
    return {mode for label in labels for mode in label.split("|")}


def test_gpu_prepare_knows_every_gpu_check_mode() -> None:
    # a mode gpu_check.sh runs but gpu_prepare.sh refuses (or carries no data for) would
    # cost a lease's start on a bare machine
    check, prepare = _case_labels("gpu_check.sh"), _case_labels("gpu_prepare.sh")
    assert check and check == prepare
    listed = re.search(r'^modes="(.+)"', (ROOT / "benchmarks" / "gpu_prepare.sh").read_text(), re.M)
    assert listed is not None
    assert set(re.split(r", | or ", listed.group(1))) == check
