from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from imgcluster import decode as dec

from conftest import make_bad_files


def _save(im: Image.Image, path: Path, **kw: object) -> str:
    im.save(path, **kw)
    return str(path)


@pytest.mark.parametrize(
    ("mode", "fmt", "grey"),
    [
        ("L", "PNG", True),
        ("LA", "PNG", True),
        ("RGB", "PNG", False),
        ("RGBA", "PNG", False),
        ("1", "PNG", True),
        ("CMYK", "JPEG", False),
        ("I;16", "PNG", True),
        ("I", "TIFF", True),
        ("F", "TIFF", True),
        ("RGB", "WEBP", False),
        ("RGB", "BMP", False),
    ],
)
def test_every_mode_decodes_to_grey_or_rgb(tmp_path: Path, mode: str, fmt: str, grey: bool) -> None:
    im = Image.new(mode, (30, 20))
    path = _save(im, tmp_path / f"x.{fmt.lower()}", format=fmt)
    assert dec.probe(path).grey is grey
    for channels in (1, 3):
        arr = dec.decode(path, 16, channels)
        assert arr.shape == (channels, 16, 16) and arr.dtype == np.uint8


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    out = dec.decode(path, 8, 1)
    assert 126 <= out.mean() <= 129


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    assert dec.decode(_save(rgba, tmp_path / "t.png"), 8, 3).min() == 255
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    path = _save(pal, tmp_path / "p.png", transparency=0)
    assert dec.decode(path, 8, 3).min() == 255
    assert dec.decode(path, 8, 1).min() == 255


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white as stored
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the left half becomes the top
    path = _save(im, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = dec.decode(path, 20, 1)[0]
    assert out[:8].mean() > 200 and out[-8:].mean() < 50
    # without the tag the same pixels show white on the left
    plain = _save(Image.fromarray(arr), tmp_path / "plain.jpg", quality=95)
    out = dec.decode(plain, 20, 1)[0]
    assert out[:, :8].mean() > 200 and out[:, -8:].mean() < 50


def test_resize_keeps_the_centre_square(tmp_path: Path) -> None:
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, 10:20] = 255  # only the centre third is white
    out = dec.decode(_save(Image.fromarray(arr), tmp_path / "wide.png"), 10, 1)[0]
    assert out.min() >= 200  # the crop saw only the white centre


def test_large_jpeg_uses_draft_and_matches_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    y, x = np.mgrid[0:1200, 0:1600]
    arr = np.stack([x * 255 // 1600, y * 255 // 1200, (x + y) * 255 // 2800], -1).astype(np.uint8)
    path = _save(Image.fromarray(arr), tmp_path / "big.jpg", quality=95)
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        result = original(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = dec.decode(path, 32, 3)
    assert scales == [8]  # decoded at 1/8 scale
    with Image.open(path) as im:
        full = im.convert("RGB").resize(
            (32, 32), Image.Resampling.BILINEAR, box=(200, 0, 1400, 1200)
        )
    assert np.abs(fast.transpose(1, 2, 0).astype(int) - np.asarray(full, dtype=int)).mean() < 4


def test_first_frame_of_animated_gif_and_multipage_tiff(tmp_path: Path) -> None:
    frames = [Image.new("L", (8, 8), v) for v in (10, 200, 90)]
    gif = _save(frames[0], tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    tif = _save(frames[0], tmp_path / "a.tif", save_all=True, append_images=frames[1:])
    for path in (gif, tif):
        assert abs(int(dec.decode(path, 8, 1).mean()) - 10) <= 2


def test_bad_files_raise_decode_error_with_reason(tmp_path: Path) -> None:
    expected = make_bad_files(tmp_path)
    for name, word in expected.items():
        with pytest.raises(dec.DecodeError, match=word):
            dec.decode(str(tmp_path / name), 16, 3)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(dec.DecodeError, match="permission denied"):
        dec.decode(str(path), 4, 1)


def test_reason_for_permission_error() -> None:
    assert dec._reason(PermissionError(13, "Permission denied")) == "permission denied"


def test_decode_chunk_marks_failures_and_keeps_going(tmp_path: Path) -> None:
    good = _save(Image.new("L", (8, 8), 77), tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    batch, reasons = dec.decode_chunk([good, str(tmp_path / "bad.png"), good], 8, 1)
    assert [bool(r) for r in reasons] == [False, True, False]
    assert batch[0].mean() == 77 and batch[2].mean() == 77


def test_worker_pool_gives_the_same_result_as_inline(tmp_path: Path) -> None:
    paths = []
    for i in range(80):  # above the in-process threshold
        paths.append(_save(Image.new("L", (6, 6), i), tmp_path / f"{i}.png"))
    with dec.Workers(len(paths), workers=2) as pool:
        assert not pool.inline
        parallel = np.concatenate(
            [b for b, _ in pool.map(dec.decode_chunk, pool.chunks(paths), 6, 1)]
        )
    inline, _ = dec.decode_chunk(paths, 6, 1)
    assert np.array_equal(parallel, inline)


def test_workers_do_not_run_the_parents_main_script(tmp_path: Path) -> None:
    """multiprocessing re-runs the parent's script in each new worker unless it is hidden: a
    script importing torch at the top made every worker import it (seconds each)."""
    for i in range(80):  # above the in-process threshold
        Image.new("L", (6, 6), i).save(tmp_path / f"{i}.png")
    log = tmp_path / "imported.txt"
    script = tmp_path / "script.py"
    script.write_text(
        "import os, sys\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(f'{os.getpid()}\\n')\n"
        "from imgcluster import decode as dec\n"
        "if __name__ == '__main__':\n"
        f"    paths = [os.path.join({str(tmp_path)!r}, f'{{i}}.png') for i in range(80)]\n"
        "    with dec.Workers(len(paths), workers=2) as pool:\n"
        "        done = sum(len(r) for r in pool.map(dec.probe_chunk, pool.chunks(paths)))\n"
        "    spec = sys.modules['__main__'].__spec__\n"
        "    print(done, spec is None, __file__ == sys.argv[0])\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.split() == ["80", "True", "True"]  # all probed; __main__ restored
    assert len(log.read_text().split()) == 1  # the parent alone ran the script
