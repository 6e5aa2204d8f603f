from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.cache import load_images
from imgcluster.errors import ImgclusterError, UsageError
from imgcluster.files import find_images
from imgcluster.report import Reporter

from conftest import make_bad_files


def _load(folder: Path, cache: Path, **kw):  # type: ignore[no-untyped-def]
    return load_images(find_images([folder]), cache_dir=cache, **kw)


def test_second_load_reuses_every_row(toy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _load(toy, cache)
    assert first.reused == 0 and first.images.shape == (36, 1, 20, 20)
    second = _load(toy, cache)
    assert second.reused == 36
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))


def test_only_changed_files_are_decoded_again(toy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = _load(toy, cache)
    changed = toy / "left" / "03.png"
    Image.new("L", (20, 20), 7).save(changed)
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse clocks
    Image.new("L", (20, 20), 99).save(toy / "left" / "new.png")
    (toy / "top" / "00.png").unlink()
    after = _load(toy, cache)
    assert after.reused == 34  # 36 - changed - deleted
    rels = [f.rel for f in after.files]
    assert "top/00.png" not in rels and "left/new.png" in rels
    assert after.images[rels.index("left/03.png")].max() == 7
    assert after.images[rels.index("left/new.png")].min() == 99
    unchanged = rels.index("centre/05.png")
    old_rels = [f.rel for f in before.files]
    assert np.array_equal(after.images[unchanged], before.images[old_rels.index("centre/05.png")])


def test_working_size_and_channels_have_their_own_cache(toy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert _load(toy, cache).image_size == 20  # median shorter side
    small = _load(toy, cache, image_size=8, channels=3)
    assert small.images.shape == (36, 3, 8, 8) and small.reused == 0
    assert _load(toy, cache, image_size=8, channels=3).reused == 36


def test_colour_anywhere_makes_three_channels(toy: Path, tmp_path: Path) -> None:
    Image.new("RGB", (20, 20), (255, 0, 0)).save(toy / "top" / "red.png")
    assert _load(toy, tmp_path / "c").channels == 3


def test_bad_files_are_skipped_with_one_warning_each(toy: Path, tmp_path: Path) -> None:
    expected = make_bad_files(toy / "bad")
    reporter = Reporter(quiet=True)
    decoded = _load(toy, tmp_path / "c", reporter=reporter)
    assert len(decoded.files) == 36
    assert sorted(Path(p).name for p, _ in decoded.skipped) == sorted(expected)
    assert len(reporter.warnings) == len(expected)
    for name, word in expected.items():
        assert any(name in w and word in w for w in reporter.warnings), name
    # failures are remembered in the cache and reported again without re-reading
    again = Reporter(quiet=True)
    assert _load(toy, tmp_path / "c", reporter=again).reused == 36
    assert sorted(again.warnings) == sorted(reporter.warnings)


def test_strict_turns_a_bad_file_into_an_error(toy: Path, tmp_path: Path) -> None:
    (toy / "top" / "broken.jpg").write_bytes(b"")
    with pytest.raises(ImgclusterError, match=r"broken\.jpg: empty file.*--strict"):
        _load(toy, tmp_path / "c", strict=True)


def test_empty_folder_and_all_bad_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files"):
        _load(tmp_path / "empty", tmp_path / "c")
    make_bad_files(tmp_path / "bad")
    with pytest.raises(UsageError, match=r"bad: none of the 6 files could be decoded"):
        _load(tmp_path / "bad", tmp_path / "c")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "notes.png").write_text("not an image\n")
    with pytest.raises(UsageError, match="one: its one file is not a readable image"):
        _load(tmp_path / "one", tmp_path / "c")


def test_without_cache_nothing_is_written(toy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "never"
    decoded = load_images(find_images([toy]), cache_dir=cache, use_cache=False)
    assert decoded.images.shape[0] == 36 and not cache.exists()


def test_parallel_decode_fills_the_cache_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(100):
        Image.new("L", (10, 10), i).save(folder / f"{i:03d}.png")
    decoded = _load(folder, tmp_path / "c", workers=2)
    assert [int(img.mean()) for img in decoded.images] == list(range(100))
