from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from imgcluster import train
from imgcluster.autok import choose_k, parse_range
from imgcluster.cache import load_images
from imgcluster.errors import UsageError
from imgcluster.files import find_images


def test_auto_k_finds_three_obvious_groups(toy: Path) -> None:
    images = load_images(find_images([toy])).images
    auto = choose_k(np.asarray(images), (2, 8))
    assert auto.k == 3
    assert set(auto.scores) == set(range(2, 9)) and auto.scores[3] == max(auto.scores.values())


def test_train_with_k_auto_records_the_choice(toy: Path, tmp_path: Path) -> None:
    result = train([toy], "auto", k_range=(2, 6), out=tmp_path / "run", sheets=False)
    assert result.k == 3 and len(result.sizes) == 3 and result.auto_k["k"] == 3
    cfg = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert cfg["train"]["k"] == 3  # a replay uses the chosen K
    assert cfg["auto_k"]["criterion"] == "silhouette" and len(cfg["auto_k"]["scores"]) == 5


def test_range_parsing() -> None:
    assert parse_range("2:30") == (2, 30)
    for bad in ("2-30", "5:2", "0:3", "x:y"):
        with pytest.raises(UsageError):
            parse_range(bad)
    with pytest.raises(UsageError, match="'auto'"):
        train(["."], "many")
