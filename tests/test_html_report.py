"""The HTML report: self-contained, every cluster shown, and it runs in a real browser."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster import train
from imgcluster.html_report import _gallery, build_report
from imgcluster.labels import read_labels


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        for key in ("src", "href"):
            value = a.get(key) or ""
            if tag in ("img", "image", "script", "link") and value:
                (
                    self.images if value.startswith("data:image/png;base64,") else self.external
                ).append(value)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_toy_folder

    folder = make_toy_folder(tmp_path_factory.mktemp("rep") / "toy")
    run = train([folder], 3, out=folder.parent / "run").run_dir
    return build_report(run)


def test_report_is_self_contained_and_shows_every_cluster(report: Path) -> None:
    text = report.read_text()
    page = _Page()
    page.feed(text)
    assert page.sections == ["cluster-0", "cluster-1", "cluster-2"]
    assert not page.external  # nothing loaded from elsewhere: it works offline
    assert len(page.images) >= 36
    Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))).verify()
    assert "ACC 1.0000" in text and "Training curves" in text and "Map of the embeddings" in text


def test_gallery_counts_one_image_in_the_singular(report: Path) -> None:
    labels = read_labels(report.parent / "labels.csv")
    assert "(1 image)" in _gallery(0, np.array([0]), labels, 24)
    assert "(2 images)" in _gallery(0, np.array([0, 1]), labels, 24)


def test_report_loads_in_a_headless_browser(report: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("IMGCLUSTER_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (IMGCLUSTER_REQUIRE_BROWSER is set)")
        pytest.skip("no chromium on this machine")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    result = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    for c in range(3):
        assert f'id="cluster-{c}"' in dom
    assert dom.count('href="#cluster-') == 3  # the script built the cluster index
    assert "Uncaught" not in result.stderr
