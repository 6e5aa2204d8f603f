"""Batched image augmentation on the training device, with random parameters per image.

Every geometric change (random resized crop, crop and resize back, horizontal
flip, rotation by an angle or by a multiple of 90°) is folded into one 2×3
affine matrix per image and applied with a single ``grid_sample`` (or, with
``geometry="cv2"``, into one sampling grid that repeats cv2 and TF 1's whole-pixel
crops and nearest-neighbour resize exactly); the colour
changes (brightness, contrast, saturation, hue, random greyscale) and Gaussian
noise are tensor ops on the whole batch. Random numbers come from
``imgcluster.rng``, so a batch augmented under the same key is the same on the
CPU and on the GPU, and no step waits for the host.

Images are float tensors in [0, 1], N×C×H×W (C = 1 or 3); ``to_float`` turns the
uint8 cache rows into that. Colour jitter follows torchvision's definitions, in
the fixed order brightness, contrast, saturation, hue; or, with ``TFJitter``,
TensorFlow 1's, as code written for it (ADC's) applied them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import rng

_GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision
# columns of the per-image uniform draw
_SIDE, _RATIO, _CX, _CY, _ANGLE, _QUARTER, _FLIP = range(7)
_BRIGHT, _CONTRAST, _SAT, _HUE, _GREYP, _PARAMS = range(7, 13)


@dataclass(frozen=True)
class TFJitter:
    """Colour jitter as TensorFlow 1 computes it on images scaled to [-1, 1], the way the ADC
    authors' code applies it: ``random_saturation``, ``random_brightness``, ``random_contrast``,
    ``random_hue`` in that order, clipped once at the end.

    It differs from torchvision's: brightness is *added* (uniform in [-b, b] on the [-1, 1]
    scale), contrast pivots on each channel's own mean, and TF's HSV conversion gives a pixel
    with no channel above 0 (mid-grey) saturation 0, so the saturation and hue steps turn such
    pixels grey (at their brightest channel), and the saturation step, which clips saturation
    to 1, lifts the negative channels of brighter pixels to 0 or above."""

    brightness: float = 0.0  # TF's max_delta, on the [-1, 1] scale
    saturation: tuple[float, float] = (1.0, 1.0)  # factor range
    contrast: tuple[float, float] = (1.0, 1.0)  # factor range
    hue: float = 0.0  # TF's max_delta: shift of the hue circle uniform in [-h, h]

    def __post_init__(self) -> None:
        for name in ("saturation", "contrast"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range 0 <= lo <= hi, got {(lo, hi)}")
        if self.brightness < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("brightness must be >= 0 and hue in [0, 0.5]")


@dataclass(frozen=True)
class AugmentConfig:
    """What to apply; everything off by default.

    crop: "none"; "resized" (torchvision RandomResizedCrop: area fraction in
    ``crop_scale``, aspect ratio in ``crop_ratio``); or "square" (a square crop
    whose side is a fraction of the image, uniform in ``crop_scale`` or drawn
    from ``crop_sides``, resized back: "random crop then resize").
    """

    crop: str = "none"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_sides: tuple[float, ...] = ()
    flip: bool = False
    rotate: float = 0.0  # degrees: angle uniform in [-rotate, rotate]
    rotate90: bool = False  # a random multiple of 90°
    brightness: float = 0.0  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # shift uniform in [-h, h] of the hue circle (h <= 0.5)
    grey_p: float = 0.0  # probability of turning an image grey
    noise: float = 0.0  # standard deviation of added Gaussian noise
    padding: str = "zeros"  # what rotations reveal at the corners: zeros, grey, border, reflection
    tf_jitter: TFJitter | None = None  # in place of brightness, contrast, saturation and hue
    # how the crop and rotation resample: "affine", one bilinear resampling of both; "cv2",
    # as code built on cv2 and TF 1 (ADC's) did: see ``cv2_grid``
    geometry: str = "affine"

    def __post_init__(self) -> None:
        if self.crop not in ("none", "resized", "square"):
            raise ValueError(f"crop must be none, resized or square, got {self.crop!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if any(not 0 < s <= 1 for s in self.crop_sides):
            raise ValueError(f"crop_sides must be fractions in (0, 1], got {self.crop_sides}")
        if not 0 <= self.hue <= 0.5 or not 0 <= self.grey_p <= 1:
            raise ValueError("hue must be in [0, 0.5] and grey_p in [0, 1]")
        if self.padding not in ("zeros", "grey", "border", "reflection"):
            raise ValueError(
                f"padding must be zeros, grey, border or reflection, got {self.padding!r}"
            )
        if self.geometry not in ("affine", "cv2"):
            raise ValueError(f"geometry must be affine or cv2, got {self.geometry!r}")
        if self.geometry == "cv2" and (self.crop == "resized" or self.crop_sides or self.rotate90):
            raise ValueError("geometry cv2 takes a square crop from crop_scale and no rotate90")
        torchvision_jitter = (self.brightness, self.contrast, self.saturation, self.hue)
        if self.tf_jitter is not None and any(torchvision_jitter):
            raise ValueError("give tf_jitter or brightness/contrast/saturation/hue, not both")

    @property
    def geometric(self) -> bool:
        return self.crop != "none" or self.flip or self.rotate > 0 or self.rotate90


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def augment(x: torch.Tensor, cfg: AugmentConfig, k: rng.Key) -> torch.Tensor:
    """A randomly changed copy of each image of ``x`` (float, [0, 1]); ``k`` is the batch's key
    (an int, or a 0-d tensor holding one: the same images)."""
    # every per-image parameter comes from one draw: a few kernels, not dozens, per batch
    u = rng.uniform((len(x), _PARAMS), k, x.device)
    if cfg.geometric:
        grid = _grid(x, cfg, u) if cfg.geometry == "affine" else _cv2_random_grid(x, cfg, u)
        x = _resample(x, grid, cfg.padding)
    x = _colour(x, cfg, u) if cfg.tf_jitter is None else _tf_colour(x, cfg.tf_jitter, u)
    if cfg.noise > 0:
        x = x + cfg.noise * rng.normal(tuple(x.shape), rng.key(k, 20), x.device)
    if cfg.noise > 0 or cfg.tf_jitter is not None:  # TF's jitter leaves the clipping to here
        x = x.clamp(0, 1)
    return x


def _resample(x: torch.Tensor, grid: torch.Tensor, padding: str) -> torch.Tensor:
    if padding == "grey":  # zeros around the mid-grey value: what cv2 fills a [-1, 1] image with
        return _resample(x - 0.5, grid, "zeros") + 0.5
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def centre_crop(x: torch.Tensor, side: float) -> torch.Tensor:
    """The centre square of ``side`` × the image, resized back (an inference view)."""
    if side >= 1:
        return x
    theta = x.new_zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def four_rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image at 0, 90, 180 and 270 degrees (exact), and the rotation labels 0..3."""
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    labels = torch.arange(4 * len(x), device=x.device) // len(x)  # 0…0 1…1 2…2 3…3
    return rotated, labels


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma N×1×H×W of an RGB (or already grey) batch."""
    if x.shape[1] == 1:
        return x
    # weights as Python numbers: a tensor made from them would be a host-to-device copy,
    # which a step captured as a CUDA graph cannot hold
    r, g, b = x.split(1, dim=1)
    return r * _GREY[0] + g * _GREY[1] + b * _GREY[2]


# -- geometry ------------------------------------------------------------------------------


def _grid(x: torch.Tensor, cfg: AugmentConfig, u: torch.Tensor) -> torch.Tensor:
    """Sampling grid of the per-image affine map: input = centre + S · R · F · output."""
    n, dev = len(x), x.device
    sx, sy, cx, cy = _crop_boxes(n, cfg, u, dev)
    angle = torch.zeros(n, device=dev)
    if cfg.rotate > 0:
        angle = angle + math.radians(cfg.rotate) * (2 * u[:, _ANGLE] - 1)
    if cfg.rotate90:
        angle = angle + (math.pi / 2) * (u[:, _QUARTER] * 4).floor().clamp_max(3)
    flip = torch.ones(n, device=dev)
    if cfg.flip:
        flip = torch.where(u[:, _FLIP] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([sx * cos * flip, -sx * sin, cx], 1),
            torch.stack([sy * sin * flip, sy * cos, cy], 1),
        ],
        1,
    )
    return F.affine_grid(theta, list(x.shape), align_corners=False)


def _cv2_random_grid(x: torch.Tensor, cfg: AugmentConfig, u: torch.Tensor) -> torch.Tensor:
    """``cv2_grid`` with the per-image draws of the authors' ``apply_augmentation``: angle
    uniform in ±rotate; crop fraction ``1 − p``, p uniform in [0, 1 − lo) (crop_scale (lo, 1));
    ``tf.random_crop``'s offsets uniform over the whole-pixel positions; a fair coin flip."""
    n, _, h, w = x.shape
    zero = torch.zeros(n, device=x.device)
    angle = cfg.rotate * (2 * u[:, _ANGLE] - 1) if cfg.rotate > 0 else zero
    if cfg.crop == "square":
        lo, hi = cfg.crop_scale
        fraction = hi - (hi - lo) * u[:, _SIDE]  # in (lo, hi]: 1 − p with p in [1 − hi, 1 − lo)
        side_h, side_w = (h * fraction).floor(), (w * fraction).floor()
    else:
        side_h, side_w = zero + h, zero + w
    top = (u[:, _CY] * (h - side_h + 1)).floor().minimum(h - side_h)
    left = (u[:, _CX] * (w - side_w + 1)).floor().minimum(w - side_w)
    flip = u[:, _FLIP] < 0.5 if cfg.flip else zero.bool()
    return cv2_grid((h, w), angle, (side_h, side_w), (top, left), flip)


def cv2_grid(
    size: tuple[int, int],
    degrees: torch.Tensor,
    sides: tuple[torch.Tensor, torch.Tensor],
    corner: tuple[torch.Tensor, torch.Tensor],
    flip: torch.Tensor,
) -> torch.Tensor:
    """Sampling grid (for ``grid_sample``, ``align_corners=False``) of a rotation, crop and
    flip done as the ADC authors' cv2 + TF 1 code did them, one after another:

    1. ``cv2.warpAffine(x, cv2.getRotationMatrix2D((W/2, H/2), degrees, 1))``: bilinear,
       about the pixel (W/2, H/2) (half a pixel off the image's centre), counter-clockwise
       for positive degrees; output pixel d reads the input at c + A⁻¹(d − c), where
       A = [[cos, sin], [−sin, cos]];
    2. ``tf.random_crop`` to whole pixels, ``sides`` (h, w) at ``corner`` (top, left);
    3. ``tf.image.resize_images(..., NEAREST_NEIGHBOR)`` back to H × W (TF 1: output pixel i
       takes crop pixel ⌊i · side / H⌋, no half-pixel centres);
    4. the left-right flip where ``flip``.

    Steps 2-4 only pick whole pixels of the rotated image, so the chain is one bilinear
    lookup at the rotation's source point of each picked pixel. (cv2 rounds source points
    to 1/32 pixel; this does not.)"""
    h, w = size
    dev = degrees.device
    cols = torch.arange(w, device=dev, dtype=torch.float32)
    cols = torch.where(flip[:, None], w - 1 - cols, cols)  # N×W: the flip comes last
    x = corner[1][:, None] + (cols * (sides[1][:, None] / w)).floor()  # N×W, rotated image
    y = corner[0][:, None] + (torch.arange(h, device=dev) * (sides[0][:, None] / h)).floor()
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    dx, dy = x[:, None, :] - w / 2, y[:, :, None] - h / 2  # N×1×W, N×H×1
    src_x = cos * dx - sin * dy + w / 2
    src_y = sin * dx + cos * dy + h / 2
    # pixel i's centre is at normalised (2i + 1) / size − 1 when align_corners is False
    return torch.stack([(2 * src_x + 1) / w - 1, (2 * src_y + 1) / h - 1], dim=-1)


def _crop_boxes(
    n: int, cfg: AugmentConfig, u: torch.Tensor, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-sizes (sx, sy) and centres (cx, cy) of the crops in normalised coordinates."""
    if cfg.crop == "none":
        one, zero = torch.ones(n, device=dev), torch.zeros(n, device=dev)
        return one, one, zero, zero
    lo, hi = cfg.crop_scale
    if cfg.crop == "resized":
        area = lo + (hi - lo) * u[:, _SIDE]
        log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, _RATIO])
        sx = torch.sqrt(area * ratio).clamp_max_(1.0)
        sy = torch.sqrt(area / ratio).clamp_max_(1.0)
    elif cfg.crop_sides:
        # one of the sides, by where-chain rather than indexing a tensor made from the list:
        # a host-to-device copy inside a step would stop it being captured as a CUDA graph
        pick = (u[:, _SIDE] * len(cfg.crop_sides)).floor().clamp_max(len(cfg.crop_sides) - 1)
        sx = torch.full((n,), cfg.crop_sides[0], device=dev)
        for i, side in enumerate(cfg.crop_sides[1:], 1):
            sx = torch.where(pick == i, side, sx)
        sy = sx
    else:
        sx = sy = lo + (hi - lo) * u[:, _SIDE]
    cx = (1 - sx) * (2 * u[:, _CX] - 1)
    cy = (1 - sy) * (2 * u[:, _CY] - 1)
    return sx, sy, cx, cy


# -- colour --------------------------------------------------------------------------------


def _factor(u: torch.Tensor, amount: float) -> torch.Tensor:
    """Per-image factors uniform in [max(0, 1 - amount), 1 + amount], shaped N×1×1×1."""
    return _between(u, (max(0.0, 1 - amount), 1 + amount)).view(-1, 1, 1, 1)


def _colour(x: torch.Tensor, cfg: AugmentConfig, u: torch.Tensor) -> torch.Tensor:
    rgb = x.shape[1] == 3
    if cfg.brightness > 0:
        x = (x * _factor(u[:, _BRIGHT], cfg.brightness)).clamp_(0, 1)
    if cfg.contrast > 0:
        mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * _factor(u[:, _CONTRAST], cfg.contrast) + mean).clamp_(0, 1)
    if cfg.saturation > 0 and rgb:
        g = grey(x)
        x = ((x - g) * _factor(u[:, _SAT], cfg.saturation) + g).clamp_(0, 1)
    if cfg.hue > 0 and rgb:
        shift = (cfg.hue * (2 * u[:, _HUE] - 1)).view(-1, 1, 1)
        h, s, v = _rgb_to_hsv(x)
        x = _hsv_to_rgb(torch.remainder(h + shift, 1.0), s, v)
    if cfg.grey_p > 0 and rgb:
        turn = (u[:, _GREYP] < cfg.grey_p).view(-1, 1, 1, 1)
        x = torch.where(turn, grey(x).expand_as(x), x)
    return x


def _tf_colour(x: torch.Tensor, j: TFJitter, u: torch.Tensor) -> torch.Tensor:
    """TF 1's saturation, brightness, contrast and hue steps on the [-1, 1] scale, unclipped."""
    y = x * 2.0 - 1.0
    rgb = y.shape[1] == 3
    if rgb and j.saturation != (1.0, 1.0):
        h, s, v = _rgb_to_hsv(y)  # as TF's: saturation 0 where no channel is above 0
        factor = _between(u[:, _SAT], j.saturation).view(-1, 1, 1)
        y = _hsv_to_rgb(h, (s * factor).clamp(0, 1), v, clip=False)
    if j.brightness > 0:
        y = y + (j.brightness * (2 * u[:, _BRIGHT] - 1)).view(-1, 1, 1, 1)
    if j.contrast != (1.0, 1.0):
        mean = y.mean(dim=(2, 3), keepdim=True)  # each channel its own mean
        y = (y - mean) * _between(u[:, _CONTRAST], j.contrast).view(-1, 1, 1, 1) + mean
    if rgb and j.hue > 0:
        h, s, v = _rgb_to_hsv(y)
        shift = (j.hue * (2 * u[:, _HUE] - 1)).view(-1, 1, 1)
        y = _hsv_to_rgb(torch.remainder(h + shift, 1.0), s, v, clip=False)
    return (y + 1.0) / 2.0


def _between(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * u


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    flat = delta == 0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1.0), 0.0)
    d = torch.where(flat, 1.0, delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, 0.0, torch.remainder(h / 6.0, 1.0))
    return h, s, maxc


def _hsv_to_rgb(
    h: torch.Tensor, s: torch.Tensor, v: torch.Tensor, clip: bool = True
) -> torch.Tensor:
    """colorsys.hsv_to_rgb in closed form: channel c(n) = v − v·s·clamp(min(k, 4 − k), 0, 1),
    k = (n + 6h) mod 6, with n = 5, 3, 1 for r, g, b. The same numbers as the sector table
    (p, q, t) without building it (N×3×6×H×W) and gathering from it. Offsets are Python
    numbers: a tensor of them would be a host-to-device copy."""
    h6, vs = h * 6.0, v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    rgb = torch.stack(channels, 1)
    return rgb.clamp_(0, 1) if clip else rgb
