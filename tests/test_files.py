from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from imgcluster.errors import UsageError
from imgcluster.files import find_images


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), 128).save(path, format="PNG")
    return path


def test_finds_every_extension_in_any_case_recursively(tmp_path: Path) -> None:
    names = [
        "a.jpg",
        "b.JPEG",
        "c.Png",
        "d.bmp",
        "e.GIF",
        "f.webp",
        "g.tif",
        "h.TIFF",
        "sub/deeper/i.png",
    ]
    for name in names:
        _img(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "raw.cr2").write_bytes(b"x")
    found = find_images([tmp_path])
    assert [f.rel for f in found.files] == sorted(names)
    assert found.root == tmp_path


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    _img(tmp_path / "ok.png")
    _img(tmp_path / ".thumbnails" / "t.png")
    _img(tmp_path / "._ok.png")  # macOS AppleDouble companion, not an image
    assert [f.rel for f in find_images([tmp_path]).files] == ["ok.png"]


def test_folders_imgcluster_wrote_inside_an_input_are_left_out(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    done, stopped = tmp_path / "runs" / "photos-adc", tmp_path / "runs" / "photos-adc-2"
    _img(done / "sheets" / "overview.png")  # a finished run's contact sheet
    for run, model in ((done, "model.json"), (stopped, "checkpoint.safetensors")):
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.toml").write_text("[train]\n")
        (run / model).write_text("{}")
    _img(stopped / "stray.png")
    (tmp_path / "notes" / "config.toml").parent.mkdir()
    (tmp_path / "notes" / "config.toml").write_text("x = 1\n")  # a user's, beside no model
    _img(tmp_path / "notes" / "b.png")
    copied, moved = tmp_path / "sorted", tmp_path / "moved"  # two exports inside the input
    for export, source in ((copied, tmp_path / "a.png"), (moved, tmp_path / "gone.png")):
        _img(export / "cluster_00" / "a.png")
        (export / "labels.csv").write_text(
            f"path,cluster,confidence,distance,source\ncluster_00/a.png,0,1,0,{source}\n"
        )
    found = find_images([tmp_path])
    # the copy export only repeats a.png; the move export holds the only copy of its image
    assert [f.rel for f in found.files] == ["a.png", "moved/cluster_00/a.png", "notes/b.png"]
    assert sorted(found.left_out) == sorted(map(str, (done, stopped, copied)))
    assert "left out 3 folders imgcluster wrote" in (found.left_out_note() or "")
    named = find_images([done])  # a run folder named as the input is the user's choice
    assert [f.rel for f in named.files] == ["sheets/overview.png"]
    assert not named.left_out and named.left_out_note() is None


def test_order_is_sorted_and_deterministic(tmp_path: Path) -> None:
    for name in ["z.png", "a.png", "m/b.png", "B.png"]:
        _img(tmp_path / name)
    first = [f.rel for f in find_images([tmp_path]).files]
    assert first == sorted(first)
    assert first == [f.rel for f in find_images([tmp_path]).files]


def test_symlinks_are_followed_without_looping(tmp_path: Path) -> None:
    _img(tmp_path / "data" / "a.png")
    _img(tmp_path / "other" / "b.png")
    os.symlink(tmp_path / "other", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "data" / "loop")  # points back at itself
    os.symlink(tmp_path / "data" / "a.png", tmp_path / "data" / "alias.png")  # same file twice
    os.symlink(tmp_path / "missing.png", tmp_path / "data" / "broken.png")
    found = find_images([tmp_path / "data"])
    assert [f.rel for f in found.files] == ["a.png", "linked/b.png"]
    assert [(Path(p).name, why) for p, why in found.skipped] == [
        ("broken.png", "broken symbolic link")
    ]


def test_self_referencing_symlink_is_reported_not_followed(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    os.symlink(tmp_path / "self.png", tmp_path / "self.png")
    found = find_images([tmp_path])
    assert [f.rel for f in found.files] == ["a.png"]
    assert len(found.skipped) == 1


def test_files_globs_and_several_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["x/1.png", "x/2.jpg", "y/3.png", "y/sub/4.png"]:
        _img(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    found = find_images(["x", "y/sub/4.png"])
    assert [f.rel for f in found.files] == ["x/1.png", "x/2.jpg", "y/sub/4.png"]
    assert found.root == tmp_path
    assert [str(f.path) for f in found.files] == ["x/1.png", "x/2.jpg", "y/sub/4.png"]  # as named
    globbed = find_images(["**/*.png"])
    assert [f.rel for f in globbed.files] == ["x/1.png", "y/3.png", "y/sub/4.png"]


def test_overlapping_inputs_list_each_file_once(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    found = find_images([tmp_path, tmp_path / "a", tmp_path / "a" / "1.png"])
    assert [f.rel for f in found.files] == ["a/1.png"]


def test_directory_named_like_an_image_is_walked(tmp_path: Path) -> None:
    _img(tmp_path / "x.jpg" / "inner.png")
    assert [f.rel for f in find_images([tmp_path]).files] == ["x.jpg/inner.png"]


def test_explicit_non_image_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    found = find_images([tmp_path / "notes.txt"])
    assert found.files == []
    assert "extension" in found.skipped[0][1]


@pytest.mark.parametrize("bad", ["does-not-exist", "nothing-*.png"])
def test_missing_inputs_are_usage_errors(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError, match=r"no such file|matches no file"):
        find_images([tmp_path / bad])


def test_no_inputs_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        find_images([])
