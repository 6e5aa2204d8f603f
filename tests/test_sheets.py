from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgcluster import export, train
from imgcluster.labels import Labels, read_labels
from imgcluster.sheets import THUMB, cluster_members, write_sheets


def test_train_writes_a_sheet_per_cluster_and_an_overview(toy: Path, tmp_path: Path) -> None:
    run = train([toy], 3, out=tmp_path / "run").run_dir
    names = sorted(p.name for p in (run / "sheets").iterdir())
    assert names == ["cluster_00.png", "cluster_01.png", "cluster_02.png", "overview.png"]
    with Image.open(run / "sheets" / "overview.png") as im:
        assert im.height >= 3 * THUMB  # a row per cluster
    assert not (train([toy], 3, out=tmp_path / "bare", sheets=False).run_dir / "sheets").exists()


def test_members_are_ordered_nearest_the_centre_first(tmp_path: Path) -> None:
    labels = Labels(
        ["a", "b", "c", "d"],
        np.array([0, 1, 0, 0]),
        np.ones(4, np.float32),
        np.array([3.0, 1.0, 1.0, 2.0], np.float32),
        tmp_path,
    )
    members = cluster_members(labels)
    assert members[0].tolist() == [2, 3, 0] and members[1].tolist() == [1]


def test_sheet_shows_typical_images_first_and_the_odd_ones_apart(tmp_path: Path) -> None:
    paths = []
    for i, value in enumerate([0, 40, 80, 255]):
        path = tmp_path / f"{i}.png"
        Image.new("L", (8, 8), value).save(path)
        paths.append(path.name)
    # all one cluster; image 3 (white) is the farthest from the centre
    labels = Labels(
        paths,
        np.zeros(4, np.int64),
        np.ones(4, np.float32),
        np.array([0.1, 0.2, 0.3, 9.0], np.float32),
        tmp_path,
    )
    write_sheets(labels, tmp_path / "sheets", columns=2, rows=1, strip=1)
    sheet = np.asarray(Image.open(tmp_path / "sheets" / "cluster_00.png").convert("L"))
    first = sheet[22 + 4 + THUMB // 2, 4 + THUMB // 2]  # the first cell of the typical grid
    assert first == 0
    strip_row = sheet[-(4 + THUMB // 2), 4 + THUMB // 2]  # the least-typical strip
    assert strip_row == 255


def test_export_sheets_survive_a_move(toy: Path, tmp_path: Path) -> None:
    run = train([toy], 3, out=tmp_path / "run", sheets=False).run_dir
    export(run / "labels.csv", tmp_path / "sorted", mode="move", sheets=True)
    assert (tmp_path / "sorted" / "sheets" / "overview.png").exists()
    overview = np.asarray(Image.open(tmp_path / "sorted" / "sheets" / "overview.png").convert("L"))
    assert overview.std() > 10  # real thumbnails, not grey placeholders
    assert len(read_labels(tmp_path / "sorted" / "labels.csv")) == 36
    # the same move again, sources gone: the sheets are still drawn from the moved images
    again = export(run / "labels.csv", tmp_path / "sorted", mode="move", sheets=True)
    assert (again.already_there, again.skipped) == (36, [])
    redrawn = np.asarray(Image.open(tmp_path / "sorted" / "sheets" / "overview.png").convert("L"))
    assert np.array_equal(redrawn, overview)
