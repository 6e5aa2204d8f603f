"""Tiny generated data for the tests: nothing here reads ../shared or the network."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("top", "left", "centre")


def toy_image(kind: str, rng: np.random.Generator, size: int = 20) -> np.ndarray:
    """A grey image whose bright region depends on the class: easy for k-means."""
    img = rng.integers(0, 40, (size, size)).astype(np.uint8)
    h = size // 2
    if kind == "top":
        img[:h] += 200
    elif kind == "left":
        img[:, :h] += 200
    else:
        img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 200
    return img


def make_toy_folder(root: Path, per_class: int = 12, seed: int = 0, colour: bool = False) -> Path:
    """``root/<class>/<nn>.png`` for three visually distinct classes."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = toy_image(kind, rng)
            im = Image.fromarray(arr)
            if colour:
                im = Image.merge("RGB", (im, im, Image.fromarray(255 - arr)))
            im.save(root / kind / f"{i:02d}.png")
    return root


def bomb_png(path: Path, side: int = 20000) -> None:
    """A small PNG whose header claims side×side pixels, over Pillow's hard limit."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grey
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def make_bad_files(folder: Path) -> dict[str, str]:
    """Unreadable files of every kind; returns file name -> a word expected in the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    good = Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8))
    good.save(folder / "whole.jpg")
    jpg = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    good.save(folder / "whole.png")
    png = (folder / "whole.png").read_bytes()
    (folder / "whole.png").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "page.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    bomb_png(folder / "bomb.png")
    return {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "truncated.png": "truncated",
        "text.png": "not an image",
        "page.jpg": "not an image",
        "bomb.png": "too large",
    }


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own decode cache, never the user's ~/.cache."""
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return make_toy_folder(tmp_path / "toy")


def make_hostile_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """A folder like a scraped dump: good images of every awkward kind and bad files of every
    kind. Returns (relative paths of the good images, relative path -> reason word of the bad)."""
    import os

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    good: set[str] = set()

    def keep(rel: str, im: Image.Image, **kw: object) -> None:
        path = Path(os.fsdecode(os.fsencode(root) + b"/" + os.fsencode(rel)))
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, **kw)
        good.add(rel)

    photo = Image.fromarray(rng.integers(0, 255, (40, 30, 3)).astype(np.uint8))
    keep("plain.jpg", photo)
    keep("cmyk.jpg", photo.convert("CMYK"))
    keep("grey16.png", Image.fromarray(rng.integers(0, 65535, (30, 30)).astype(np.uint16)))
    pal = photo.convert("P")
    keep("palette.png", pal, transparency=0)
    keep("rgba.png", photo.convert("RGBA"))
    keep("la.png", photo.convert("LA"))
    keep("tiny.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    frames = [Image.new("L", (20, 20), v) for v in (10, 120, 240)]
    keep("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    keep("pages.tif", frames[0], save_all=True, append_images=frames[1:])
    exif = photo.getexif()
    exif[0x0112] = 6
    keep("rotated.jpg", photo, exif=exif)
    keep("with space.png", photo)
    keep("new\nline.png", photo)
    keep("-leading-dash.png", photo)
    keep(os.fsdecode(b"latin1-\xe9.png"), photo)
    keep("dup-a.png", photo)
    keep("dup-b.png", photo)  # same bytes as dup-a: both are images and both are labelled
    keep("folder.jpg/inside.png", photo)  # a folder named like an image is walked into
    unreadable = root / "unreadable.png"
    photo.save(unreadable)
    unreadable.chmod(0)
    bad = {f"junk/{name}": word for name, word in make_bad_files(root / "junk").items()}
    if os.geteuid() == 0:  # root reads files without read permission
        good.add("unreadable.png")
    else:
        bad["unreadable.png"] = "permission denied"
    os.symlink(root / "nowhere.png", root / "broken.png")
    os.symlink(root / "loop-b.jpg", root / "loop-a.jpg")
    os.symlink(root / "loop-a.jpg", root / "loop-b.jpg")
    bad.update({"broken.png": "broken", "loop-a.jpg": "broken", "loop-b.jpg": "broken"})
    return good, bad
