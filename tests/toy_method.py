"""A small two-phase deep method used only by the tests to drive the training engine.

Phase "pretrain" trains a tiny MLP autoencoder on augmented images; phase "cluster"
initialises centroids from the codes and trains reconstruction + distance to the nearest
centroid. Not a paper method; it exists so that checkpoints, resume, logging and
interrupts are tested on real training.
"""

from __future__ import annotations

import os
import signal
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from imgcluster.augment import AugmentConfig, augment, to_float
from imgcluster.engine import DeviceImages, Trainer, make_optimizer, map_batches
from imgcluster.methods import FitContext, Method, register
from imgcluster.model import ClusterModel, Preprocessing, register_embedder
from imgcluster.nets import MLPAutoencoder

# global step numbers at which the method sends itself Ctrl-C; "between": Ctrl-C between
# the phases, after the first one's checkpoint
INTERRUPT_AT: set[int | str] = set()
_steps = [0]


@register_embedder
class ToyEmbedder(nn.Module):
    def __init__(self, in_dim: int, code: int) -> None:
        super().__init__()
        self.in_dim, self.code = in_dim, code
        self.ae = MLPAutoencoder(in_dim, code, hidden=(32,))

    def spec(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "code": self.code}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae(x.float() / 255.0 if x.dtype == torch.uint8 else x)


class Centroids(nn.Module):
    def __init__(self, k: int, code: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, code))


@dataclass
class ToyConfig:
    epochs: int = 2
    cluster_epochs: int = 2
    batch_size: int = 8
    code: int = 4
    carry: bool = False  # one Adam through both phases (as ADC), not a fresh one per phase
    optimizer: str = "adam"  # or "sgd": a fused SGD with momentum (MMDC's on the GPU)


@register
class ToyAE(Method):
    name = "toy-ae"
    summary = "test-only autoencoder + centroids"
    Config = ToyConfig

    def fit(self, images: np.ndarray, ctx: FitContext) -> ClusterModel:
        cfg: ToyConfig = self.config
        n, c, h, w = images.shape
        data = DeviceImages(images, ctx.device)
        net = ToyEmbedder(c * h * w, cfg.code).to(ctx.device)
        head = Centroids(self.k, cfg.code).to(ctx.device)
        trainer = Trainer(ctx, {"net": net, "head": head})
        view = AugmentConfig(flip=True, noise=0.02)
        steps = n // cfg.batch_size
        params = list(net.parameters()) + list(head.parameters())
        opt = _optimizer(cfg, params if cfg.carry else list(net.parameters()), ctx.device)
        for epoch in trainer.phase("pretrain", cfg.epochs, {"adam": opt}, steps, cfg.batch_size):
            for idx in trainer.steps(data.epoch(cfg.batch_size, trainer.key(epoch))):
                x = augment(to_float(data.take(idx)), view, trainer.key(epoch, trainer.step))
                loss = ((net.ae.reconstruct(net(x)) - x.flatten(1)) ** 2).mean()
                _update(opt, loss)
                trainer.record(len(idx), loss=loss)
        if trainer.entering("cluster"):
            if "between" in INTERRUPT_AT:
                INTERRUPT_AT.discard("between")
                raise KeyboardInterrupt
            if cfg.carry:
                trainer.carry_over({"adam": opt})
            z = map_batches(data, 16, net)
            head.weight.data.copy_(z[torch.linspace(0, n - 1, self.k).long()])
        opt2 = opt if cfg.carry else _optimizer(cfg, params, ctx.device)
        for epoch in trainer.phase(
            "cluster", cfg.cluster_epochs, {"adam": opt2}, steps, cfg.batch_size
        ):
            for idx in trainer.steps(data.epoch(cfg.batch_size, trainer.key(epoch))):
                x = to_float(data.take(idx))
                z = net(x)
                recon = ((net.ae.reconstruct(z) - x.flatten(1)) ** 2).mean()
                pull = torch.cdist(z, head.weight).min(1).values.pow(2).mean()
                _update(opt2, recon + 0.1 * pull)
                trainer.record(len(idx), loss=recon + 0.1 * pull, recon=recon, pull=pull)
            trainer.note(lr=opt2.param_groups[0]["lr"])
        return ClusterModel(
            net, head.weight.detach(), "l2", Preprocessing(h, c), self.name, asdict(cfg)
        )


def _optimizer(
    cfg: ToyConfig, params: list[nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return make_optimizer("sgd", params, 1e-2, device, momentum=0.9, fused=True)
    return make_optimizer("adam", params, 1e-3, device)


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _steps[0] += 1
    if _steps[0] in INTERRUPT_AT:
        os.kill(os.getpid(), signal.SIGINT)
