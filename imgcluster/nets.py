"""The networks the four papers use, sized from the image size and channel count.

| network | paper | input |
|---|---|---|
| ``SmallVGG`` | MMDC (MNIST) | grey or colour, any size >= 16 |
| ``SmallResNet`` (18 / 34) | MMDC (CIFAR, STL) | 32-96 px |
| ``ADCConvNet`` | ADC (MNIST: ``mnist_model_dropout``) | any size >= 8 |
| ``PreActResNet20`` | ADC (CIFAR: TF official ResNet-20 v2) | any size |
| ``DepictAE`` | DEPICT | any size >= 8 |
| ``MLPAutoencoder`` | AE-CM (D-500-500-2000-d) | flattened pixels |

Every network takes float input (N×C×H×W, or N×D for the MLP) and is built from
keyword arguments that ``spec()`` returns, so a saved model can be rebuilt.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # an encoder's (h1, h2, z)


class Net(nn.Module):
    """Base class: remembers the keyword arguments it was built with."""

    def __init__(self, **spec: Any) -> None:
        super().__init__()
        self._spec = spec

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)


def _flat_size(features: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of values ``features`` produces for one image (a dry run on zeros)."""
    with torch.no_grad():
        was_training = features.training
        features.eval()
        out = features(torch.zeros(1, in_channels, image_size, image_size))
        features.train(was_training)
    return int(out.numel())


def _init_like_mmdc(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit batch norms, N(0, 0.01) linear layers (MMDC's code)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _init_glorot(module: nn.Module) -> None:
    """Glorot-uniform weights, zero biases (TF slim / Lasagne defaults)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class SmallVGG(Net):
    """MMDC's small VGG: [conv3×3 32, pool, 64, pool, 128, pool, 256, pool] with BN + ReLU,
    then Linear to ``out_dim``, L2-normalised when ``normalize``."""

    def __init__(
        self, in_channels: int, image_size: int, out_dim: int, normalize: bool = True
    ) -> None:
        super().__init__(
            in_channels=in_channels, image_size=image_size, out_dim=out_dim, normalize=normalize
        )
        layers: list[nn.Module] = []
        c = in_channels
        for width in (32, 64, 128, 256):
            layers += [
                nn.Conv2d(c, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, 2),
            ]
            c = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.feature_dim = _flat_size(self.features, in_channels, image_size)
        self.top = nn.Linear(self.feature_dim, out_dim)
        self.normalize = normalize
        _init_like_mmdc(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.top(self.features(x))
        return l2_normalise(out) if self.normalize else out


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)), inplace=True)


class SmallResNet(Net):
    """MMDC's ResNet-18/34 for small images: conv3×3 64 (stride 1) + BN + ReLU, max-pool 2×2
    stride 2 padding 1, four stages (64, 128, 256, 512), global average pool; a Linear head to
    ``out_dim`` (L2-normalised) and, when ``rotation_head``, a 4-way rotation head."""

    STAGES: ClassVar[dict[int, tuple[int, ...]]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

    def __init__(
        self,
        in_channels: int,
        out_dim: int,
        depth: int = 18,
        rotation_head: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_dim=out_dim,
            depth=depth,
            rotation_head=rotation_head,
            normalize=normalize,
        )
        if depth not in self.STAGES:
            raise ValueError(f"depth must be 18 or 34, got {depth}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2, padding=1),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for i, (width, count) in enumerate(
            zip((64, 128, 256, 512), self.STAGES[depth], strict=True)
        ):
            for j in range(count):
                blocks.append(_BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = 512
        self.top = nn.Linear(512, out_dim)
        self.rotation = nn.Linear(512, 4) if rotation_head else None
        self.normalize = normalize
        _init_like_mmdc(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.top(self.features(x))
        return l2_normalise(out) if self.normalize else out

    def rotation_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None:
            raise RuntimeError("this network was built without a rotation head")
        return self.rotation(self.features(x))


class ADCConvNet(Net):
    """ADC's ``mnist_model_dropout``: [conv3×3 32 ×2, pool, dropout] [64 ×2, pool, dropout]
    [128 ×2, pool], flatten, fully connected to ``emb_size``; ELU after every layer (the
    embedding too, as TF slim's arg_scope applies it), 'same' convolutions, 'valid' pools."""

    def __init__(
        self, in_channels: int, image_size: int, emb_size: int = 128, dropout: float = 0.2
    ) -> None:
        super().__init__(
            in_channels=in_channels, image_size=image_size, emb_size=emb_size, dropout=dropout
        )
        layers: list[nn.Module] = []
        c = in_channels
        for i, width in enumerate((32, 64, 128)):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                nn.ELU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ELU(),
                nn.MaxPool2d(2, 2),
            ]
            if i < 2:
                layers.append(nn.Dropout(dropout))
            c = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(_flat_size(self.features, in_channels, image_size), emb_size)
        _init_glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.fc(self.features(x)))


# TF official ResNet's batch norm: running averages decay 0.997 (PyTorch counts 1 − decay)
_TF_BN_MOMENTUM = 0.003


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=_TF_BN_MOMENTUM)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=_TF_BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.project = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = x if self.project is None else self.project(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet20(Net):
    """ADC's CIFAR network (TF official ResNet v2 for CIFAR, 20 layers): conv3×3 16, three
    stages of ``blocks`` pre-activation blocks (16, 32, 64 channels), BN + ReLU, global average
    pool, dropout, fully connected to ``emb_size``. As that code: batch-norm averages decay
    0.997, convolutions start from TF's ``variance_scaling_initializer`` (truncated normal,
    std 1/√fan_in), the dense layer from Glorot-uniform."""

    def __init__(
        self, in_channels: int, emb_size: int = 64, blocks: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__(in_channels=in_channels, emb_size=emb_size, blocks=blocks, dropout=dropout)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(blocks):
                layers.append(_PreActBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(64, momentum=_TF_BN_MOMENTUM)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(64, emb_size)
        _init_glorot(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                std = (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** -0.5
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(self.dropout(F.adaptive_avg_pool2d(out, 1).flatten(1)))


def depict_geometry(image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """DEPICT's (kernels, paddings) for an image size, from the authors' per-data-set choices:
    MNIST/USPS (<= 28 px) (4, 5)/(0, 2); FRGC/CMU-PIE (32 px) (4, 5)/(2, 2);
    YTF (55 px) (5, 4)/(2, 0)."""
    if image_size <= 28:
        return (4, 5), (0, 2)
    if image_size <= 40:
        return (4, 5), (2, 2)
    return (5, 4), (2, 0)


class DepictAE(Net):
    """DEPICT's convolutional autoencoder: dropout on the input, two stride-2 convolutions of
    ``channels`` filters with LeakyReLU(0.01) (dropout between), a dense tanh embedding of size
    ``k``; the decoder mirrors it (dense + LeakyReLU, two transposed convolutions, tanh output).

    ``encode`` returns every encoder activation (h1, h2, z) and ``decode`` the decoder's
    reconstructions of them in reverse order (ĥ2, ĥ1, x̂), for the layer-wise loss.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        k: int,
        channels: int = 50,
        dropout: float = 0.1,
        kernels: tuple[int, int] | None = None,
        paddings: tuple[int, int] | None = None,
    ) -> None:
        auto_k, auto_p = depict_geometry(image_size)
        kernels, paddings = tuple(kernels or auto_k), tuple(paddings or auto_p)
        super().__init__(
            in_channels=in_channels,
            image_size=image_size,
            k=k,
            channels=channels,
            dropout=dropout,
            kernels=list(kernels),
            paddings=list(paddings),
        )
        self.dropout = dropout
        self.conv1 = nn.Conv2d(in_channels, channels, kernels[0], 2, paddings[0])
        self.conv2 = nn.Conv2d(channels, channels, kernels[1], 2, paddings[1])
        s1 = (image_size + 2 * paddings[0] - kernels[0]) // 2 + 1
        s2 = (s1 + 2 * paddings[1] - kernels[1]) // 2 + 1
        if s2 < 1:
            raise ValueError(f"image size {image_size} is too small for DEPICT's encoder")
        self.shape2 = (channels, s2, s2)
        self.embed = nn.Linear(channels * s2 * s2, k)
        self.unembed = nn.Linear(k, channels * s2 * s2)
        self.deconv2 = nn.ConvTranspose2d(
            channels,
            channels,
            kernels[1],
            2,
            paddings[1],
            output_padding=_output_padding(s2, s1, kernels[1], paddings[1]),
        )
        self.deconv1 = nn.ConvTranspose2d(
            channels,
            in_channels,
            kernels[0],
            2,
            paddings[0],
            output_padding=_output_padding(s1, image_size, kernels[0], paddings[0]),
        )
        _init_glorot(self)

    def encode(self, x: torch.Tensor, noisy: bool) -> Activations:
        x = F.dropout(x, self.dropout, training=noisy)
        h1 = F.leaky_relu(self.conv1(x), 0.01)
        h2 = F.leaky_relu(self.conv2(F.dropout(h1, self.dropout, training=noisy)), 0.01)
        z = torch.tanh(self.embed(h2.flatten(1)))
        return h1, h2, z

    def encode_pair(self, x: torch.Tensor) -> tuple[Activations, Activations]:
        """``(encode(x, noisy=False), encode(x, noisy=True))``. On a GPU as one batch of 2n
        images: a step at batch 100 is bound there by kernel launches, not arithmetic, and one
        pass saves the second encoder's kernels. On the CPU, where arithmetic binds, as two
        passes (one batch of 200 was no faster there)."""
        if not x.is_cuda:
            return self.encode(x, noisy=False), self.encode(x, noisy=True)
        return self._encode_batched(x)

    def _encode_batched(self, x: torch.Tensor) -> tuple[Activations, Activations]:
        """Both pathways in one batch: the same arithmetic and the same dropout masks as two
        ``encode`` calls (drawn in the same order, on the same shapes)."""
        both = torch.cat([x, F.dropout(x, self.dropout, training=True)])
        h1 = F.leaky_relu(self.conv1(both), 0.01)
        # chunk, not slicing: its backward is one concatenation, a slice's a zeroed copy
        h1_clean, h1_noisy = h1.chunk(2)
        h2 = F.leaky_relu(
            self.conv2(torch.cat([h1_clean, F.dropout(h1_noisy, self.dropout)])), 0.01
        )
        z = torch.tanh(self.embed(h2.flatten(1)))
        (h2_clean, h2_noisy), (z_clean, z_noisy) = h2.chunk(2), z.chunk(2)
        return (h1_clean, h2_clean, z_clean), (h1_noisy, h2_noisy, z_noisy)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d2 = F.leaky_relu(self.unembed(z), 0.01).view(-1, *self.shape2)
        d1 = F.leaky_relu(self.deconv2(d2), 0.01)
        return d2, d1, torch.tanh(self.deconv1(d1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x, noisy=False)[2]


def _output_padding(size_in: int, size_out: int, kernel: int, padding: int) -> int:
    """The output_padding that makes a stride-2 transposed convolution give ``size_out``."""
    extra = size_out - ((size_in - 1) * 2 - 2 * padding + kernel)
    if not 0 <= extra <= 1:
        raise ValueError(f"cannot invert a convolution from {size_out} to {size_in} px")
    return extra


class MLPAutoencoder(Net):
    """AE-CM's autoencoder: D-500-500-2000-``code_dim`` with LeakyReLU(0.2), a linear code, and
    the mirrored decoder with a linear output."""

    def __init__(
        self,
        in_dim: int,
        code_dim: int,
        hidden: tuple[int, ...] = (500, 500, 2000),
        slope: float = 0.2,
    ) -> None:
        super().__init__(in_dim=in_dim, code_dim=code_dim, hidden=list(hidden), slope=slope)
        self.encoder = _mlp([in_dim, *hidden, code_dim], slope)
        self.decoder = _mlp([code_dim, *reversed(hidden), in_dim], slope)
        _init_glorot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def _mlp(sizes: list[int], slope: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)
