from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from imgcluster import augment as aug
from imgcluster import rng

ALL = aug.AugmentConfig(
    crop="resized",
    crop_scale=(0.3, 1.0),
    flip=True,
    rotate=20,
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.1,
    grey_p=0.2,
    noise=0.05,
)


def _batch(n: int = 16, c: int = 3, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def test_rng_is_uniform_reproducible_and_key_dependent() -> None:
    u = rng.uniform((100_000,), rng.key(1, 2), "cpu")
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.equal(u, rng.uniform((100_000,), rng.key(1, 2), "cpu"))
    assert not torch.equal(u, rng.uniform((100_000,), rng.key(1, 3), "cpu"))
    z = rng.normal((100_000,), rng.key(5), "cpu")
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    p = rng.permutation(1000, rng.key(9), "cpu")
    assert sorted(p.tolist()) == list(range(1000)) and p.tolist() != list(range(1000))
    counts = torch.bincount(rng.integers((60_000,), 6, rng.key(4), "cpu"), minlength=6)
    assert counts.min() > 9_500 and counts.max() < 10_500


def test_a_key_held_in_a_tensor_draws_the_same_numbers() -> None:
    # the CUDA-graph steps refill a key tensor before each replay: same stream as the int key
    for parts in [(0,), (7, 3), (2**33 + 5, 12, 0), (-1, 4)]:
        k = rng.key(*parts)
        kt = rng.key(*(torch.tensor(p) for p in parts))
        assert isinstance(kt, torch.Tensor) and kt.item() == k
        assert rng.key(k, 20) == rng.key(kt, 20).item() == rng.key(torch.tensor(k), 20).item()
        assert torch.equal(rng.bits(1000, k, "cpu"), rng.bits(1000, torch.tensor(k), "cpu"))
        assert torch.equal(rng.normal((50,), k, "cpu"), rng.normal((50,), torch.tensor(k), "cpu"))
    x = aug.to_float(_batch())
    for cfg in (ALL, aug.AugmentConfig(crop="square", crop_sides=(0.9, 0.7, 0.5), rotate=25)):
        k = rng.key(3, 7)
        assert torch.equal(aug.augment(x, cfg, k), aug.augment(x, cfg, torch.tensor(k)))


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_keeps_shape_dtype_and_range(channels: int) -> None:
    x = aug.to_float(_batch(c=channels))
    y = aug.augment(x, ALL, rng.key(0, 1))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)


def test_augment_is_reproducible_under_a_key_and_changes_with_it() -> None:
    x = aug.to_float(_batch())
    a = aug.augment(x.clone(), ALL, rng.key(3, 7))
    assert torch.equal(a, aug.augment(x.clone(), ALL, rng.key(3, 7)))
    assert not torch.allclose(a, aug.augment(x.clone(), ALL, rng.key(3, 8)))


def test_each_image_gets_its_own_parameters() -> None:
    one = aug.to_float(_batch(n=1)).expand(32, -1, -1, -1).contiguous()
    out = aug.augment(one, ALL, rng.key(1))
    flat = out.flatten(1)
    distinct = {tuple(np.round(row[:64].numpy(), 4)) for row in flat}
    assert len(distinct) == 32


def test_identity_config_changes_nothing() -> None:
    x = aug.to_float(_batch())
    assert torch.equal(aug.augment(x.clone(), aug.AugmentConfig(), rng.key(0)), x)


def test_flip_and_quarter_turns_are_exact() -> None:
    x = aug.to_float(_batch(n=64))
    flipped = aug.augment(x, aug.AugmentConfig(flip=True), rng.key(2))
    mirrored = (flipped - x.flip(3)).abs().flatten(1).amax(1) < 1e-5
    same = (flipped - x).abs().flatten(1).amax(1) < 1e-5
    assert torch.all(mirrored | same) and 10 < mirrored.sum() < 54
    turned = aug.augment(x, aug.AugmentConfig(rotate90=True), rng.key(3))
    for i in range(len(x)):
        assert min((turned[i] - torch.rot90(x[i], r, (1, 2))).abs().max() for r in range(4)) < 1e-4


def test_square_crop_from_discrete_sides_zooms_in() -> None:
    x = torch.zeros(8, 1, 20, 20)
    x[:, :, :2] = 1.0  # a bright top border that a crop of half the side cannot show fully
    cfg = aug.AugmentConfig(crop="square", crop_sides=(0.5,))
    y = aug.augment(x, cfg, rng.key(4))
    assert y.shape == x.shape and y.mean() < x.mean() * 1.5


def test_brightness_and_grey() -> None:
    x = torch.full((64, 3, 4, 4), 0.5)
    y = aug.augment(x, aug.AugmentConfig(brightness=0.5), rng.key(5))
    factors = y[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.5 - 1e-6 and factors.max() <= 1.5 + 1e-6 and factors.std() > 0.1
    colour = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    g = aug.augment(colour, aug.AugmentConfig(grey_p=0.5), rng.key(6))
    is_grey = (g[:, 0] == g[:, 1]).flatten(1).all(1) & (g[:, 1] == g[:, 2]).flatten(1).all(1)
    assert 15 < is_grey.sum() < 49


def test_hue_conversion_matches_colorsys() -> None:
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    h, s, v = aug._rgb_to_hsv(x)
    for i in range(8):
        for j in range(8):
            ref = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            got = (h[0, i, j].item(), s[0, i, j].item(), v[0, i, j].item())
            assert np.allclose(got, ref, atol=1e-5)
    assert torch.allclose(aug._hsv_to_rgb(h, s, v), x, atol=1e-5)


def test_noise_and_four_rotations() -> None:
    x = torch.full((4, 1, 8, 8), 0.5)
    y = aug.augment(x, aug.AugmentConfig(noise=0.1), rng.key(7))
    assert 0.07 < (y - x).std() < 0.13
    rotated, labels = aug.four_rotations(aug.to_float(_batch(n=3)))
    assert (
        rotated.shape == (12, 3, 24, 24)
        and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    )


def test_centre_crop_keeps_the_middle() -> None:
    x = torch.zeros(2, 1, 16, 16)
    x[:, :, 4:12, 4:12] = 1.0
    y = aug.centre_crop(x, 0.5)
    assert y[..., 2:-2, 2:-2].min() > 0.99 and y.min() > 0.5  # bilinear blends the outer ring
    assert torch.equal(aug.centre_crop(x, 1.0), x)


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(ValueError):
        aug.AugmentConfig(crop="zoom")
    with pytest.raises(ValueError):
        aug.AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError):
        aug.AugmentConfig(hue=0.7)


def _tf(x: torch.Tensor, **jitter: object) -> torch.Tensor:
    return aug.augment(x, aug.AugmentConfig(tf_jitter=aug.TFJitter(**jitter)), rng.key(8))


def test_tf_brightness_is_added_and_clipped_once() -> None:
    mid = _tf(torch.full((64, 1, 4, 4), 0.5), brightness=0.5)
    shift = mid[:, 0, 0, 0] - 0.5  # max_delta 0.5 on [-1, 1] is 0.25 on [0, 1]
    assert (mid == mid[:, :, :1, :1]).all() and shift.abs().max() <= 0.25 + 1e-6
    assert shift.std() > 0.1
    dark = _tf(torch.full((64, 1, 4, 4), 0.1), brightness=0.5)
    assert (dark == 0).any() and dark.max() > 0.3  # a factor in [0.5, 1.5] keeps 0.05..0.15


def test_tf_contrast_pivots_on_each_channels_mean() -> None:
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.2 + 0.4
    x[:, 0] = 0.8  # a flat red channel stays where it is; a grey pivot would move it
    y = _tf(x, contrast=(0.4, 1.8))
    assert torch.allclose(y[:, 0], x[:, 0], atol=1e-6)
    factors = y[:, 1].flatten(1).std(1) / x[:, 1].flatten(1).std(1)
    assert 0.4 - 1e-4 <= factors.min() < 0.6 and 1.6 < factors.max() <= 1.8 + 1e-4


def test_tf_saturation_and_hue_use_tfs_hsv_on_the_minus_one_to_one_scale() -> None:
    x = torch.tensor([[0.2, 0.3, 0.1], [0.9, 0.5, 0.3]]).T.reshape(1, 3, 1, 2).repeat(16, 1, 1, 1)
    y = _tf(x, saturation=(0.7, 1.3))
    # no channel above mid-grey: saturation 0, so grey at the brightest channel, any factor;
    # (0.8, 0, -0.4) on [-1, 1] has saturation 1.5, clipped to 1: min channel to 0 (0.5 here)
    expected = torch.tensor([[0.3, 0.3, 0.3], [0.9, 0.5 + 0.8 / 3 / 2, 0.5]]).T.reshape(3, 1, 2)
    assert torch.allclose(y, expected.expand_as(y), atol=1e-5)
    h = _tf(x, hue=0.2)
    assert torch.allclose(h[:, :, 0, 0], torch.full((16, 3), 0.3), atol=1e-5)
    bright = h[:, :, 0, 1]  # a hue turn keeps the brightest and darkest channel values
    assert torch.allclose(bright.amax(1), torch.full((16,), 0.9), atol=1e-5)
    assert torch.allclose(bright.amin(1), torch.full((16,), 0.3), atol=1e-5)
    assert bright.std(0).max() > 0.05


def test_grey_padding_fills_rotated_corners_with_mid_grey() -> None:
    x = torch.zeros(4, 1, 16, 16)
    for padding, corner in (("grey", 0.5), ("zeros", 0.0)):
        cfg = aug.AugmentConfig(rotate=45, rotate90=False, padding=padding)
        y = aug.augment(x, cfg, rng.key(9))
        assert y[:, :, 0, 0].max() <= corner + 1e-6 and y[:, :, 0, 0].max() >= corner - 0.2
        assert y[:, :, 8, 8].abs().max() < 1e-6  # the middle stays the image's
    with pytest.raises(ValueError):
        aug.AugmentConfig(brightness=0.5, tf_jitter=aug.TFJitter(brightness=0.5))
    with pytest.raises(ValueError):
        aug.TFJitter(contrast=(1.5, 1.0))


def _cv2_reference(img: np.ndarray, degrees: float, side: int, top: int, left: int, flip: bool):
    """One H×W image through the authors' chain, written from OpenCV's and TF 1's documented
    definitions: getRotationMatrix2D's matrix, warpAffine's inverse map with bilinear
    interpolation and a zero border, whole-pixel crop, TF 1's nearest resize, flip."""
    h, w = img.shape
    a, b = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    cx, cy = w / 2, h / 2
    m = np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy], [0, 0, 1]])
    inv = np.linalg.inv(m)
    padded = np.pad(img, 1)  # zero border
    rotated = np.zeros_like(img)
    for yy in range(h):
        for xx in range(w):
            sx, sy, _ = inv @ (xx, yy, 1)
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - x0, sy - y0
            value = 0.0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    px, py = x0 + dx, y0 + dy
                    if -1 <= px <= w and -1 <= py <= h:
                        value += wy * wx * padded[py + 1, px + 1]
            rotated[yy, xx] = value
    crop = rotated[top : top + side, left : left + side]
    picks = [int(np.floor(i * side / h)) for i in range(h)]
    out = crop[np.ix_(picks, picks)]
    return out[:, ::-1] if flip else out


@pytest.mark.parametrize(
    "degrees,side,top,left,flip",
    [
        (90.0, 16, 0, 0, False),
        (0.0, 13, 3, 1, False),
        (7.5, 13, 2, 3, True),
        (-9.0, 16, 0, 0, True),
    ],
)
def test_cv2_grid_repeats_cv2_rotation_whole_pixel_crop_and_nearest_resize(
    degrees: float, side: int, top: int, left: int, flip: bool
) -> None:
    img = np.random.default_rng(1).random((16, 16))
    t = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype)  # noqa: E731
    grid = aug.cv2_grid((16, 16), t(degrees), (t(side), t(side)), (t(top), t(left)), t(flip, bool))
    x = torch.from_numpy(img).float()[None, None]
    y = torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
    want = _cv2_reference(img, degrees, side, top, left, flip)
    assert np.abs(y[0, 0].numpy() - want).max() < 1e-5


def test_cv2_geometry_picks_whole_pixels_of_crops_within_its_bounds() -> None:
    # no rotation: each pixel holds its own index, so the output says which pixels it took:
    # whole rows and columns of a crop of side int(16 · f), f in (0.75, 1]: 12-15 (16 only
    # when f is exactly 1), in order
    index = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16) / 256
    cfg = aug.AugmentConfig(crop="square", crop_scale=(0.75, 1.0), flip=True, geometry="cv2")
    y = (aug.augment(index.expand(64, 1, 16, 16), cfg, rng.key(11)) * 256).round().long()
    sides, flips = set(), 0
    for img in y[:, 0]:
        rows, cols = img // 16, img % 16
        assert torch.all(rows == rows[:, :1]) and torch.all(cols == cols[:1])  # whole pixels
        r, c = rows[:, 0], cols[0]
        flipped = bool(c[0] > c[-1])
        flips += flipped
        c = c.flip(0) if flipped else c
        side = int(r[-1] - r[0]) + 1
        assert 12 <= side <= 16 and int(c[-1] - c[0]) + 1 == side
        # TF 1's nearest resize: output i takes crop pixel floor(i · side / 16)
        picks = (torch.arange(16) * side // 16).tolist()
        assert (r - r[0]).tolist() == picks and (c - c[0]).tolist() == picks
        sides.add(side)
    assert sides == {12, 13, 14, 15} and 16 < flips < 48
    with pytest.raises(ValueError):
        aug.AugmentConfig(crop="resized", geometry="cv2")
    with pytest.raises(ValueError):
        aug.AugmentConfig(geometry="opencv")
