#!/usr/bin/env python3
"""Training-step throughput: the engine's full step against the bare network.

    python benchmarks/throughput.py [--step mmdc-resnet18] [--batch-size 512] [--device cuda]
                                    [--steps 50] [--warmup 10] [--compile]
                                    [--precision auto|fp32|bf16] [--threads N]

For each step (one per method family, with that method's network, augmentation (the
methods' own definitions) and optimiser), two loops in the same process and at the same batch size:
  full: indices drawn on the device -> uint8 batch from DeviceImages -> augment -> forward ->
        backward -> update, exactly as the methods run it;
  bare: forward -> backward -> update on one random float batch already on the device.
Both loops run under ``--precision`` (as ``imgcluster train --precision``: ``bf16`` is bf16
autocast on the CPU too). Prints images/s of both and their ratio, and writes a JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcluster import nets, rng
from imgcluster.augment import AugmentConfig, augment, to_float
from imgcluster.device import resolve_device
from imgcluster.engine import (
    PRECISIONS,
    DeviceImages,
    autocast,
    compile_module,
    make_optimizer,
    param_groups,
    precision,
    prepare,
)
from imgcluster.methods import adc, mmdc

import common


@dataclass(frozen=True)
class Step:
    network: str
    shape: tuple[int, int, int]  # C, H, W
    build: Callable[[], nn.Module]
    view: AugmentConfig
    optimizer: str
    lr: float
    weight_decay: float
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda net, x: net(x)


def _recon(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.decode(net.encode(x, noisy=True)[2])[2]


def _mlp_recon(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.reconstruct(net(x)).view_as(x)


STEPS: dict[str, Step] = {
    "mmdc-resnet18": Step(
        "ResNet-18 (MMDC)",
        (3, 32, 32),
        lambda: nets.SmallResNet(3, 10),
        mmdc.family(3, 32).augment,
        "sgd",
        0.05,
        5e-4,
    ),
    "mmdc-vgg": Step(
        "small VGG (MMDC MNIST)",
        (1, 32, 32),
        lambda: nets.SmallVGG(1, 32, 10),
        mmdc.family(1, 32).augment,
        "sgd",
        0.05,
        5e-4,
    ),
    "adc-convnet": Step(
        "ADC conv net (MNIST)",
        (1, 28, 28),
        lambda: nets.ADCConvNet(1, 28),
        adc.augmentation(1, adc.ADCConfig().resolve(1).augment),
        "adam",
        1e-3,
        0.0,
    ),
    "adc-resnet20": Step(
        "ResNet-20 v2 (ADC CIFAR)",
        (3, 32, 32),
        lambda: nets.PreActResNet20(3),
        adc.augmentation(3, adc.ADCConfig().resolve(3).augment),
        "adam",
        1e-3,
        0.0,
    ),
    "depict-ae": Step(
        "DEPICT conv AE (MNIST)",
        (1, 28, 28),
        lambda: nets.DepictAE(1, 28, 10),
        AugmentConfig(),
        "adam",
        1e-4,
        0.0,
        _recon,
    ),
    "aecm-mlp": Step(
        "AE-CM MLP AE (MNIST)",
        (1, 28, 28),
        lambda: nets.MLPAutoencoder(784, 10),
        AugmentConfig(),
        "adam",
        1e-3,
        0.0,
        _mlp_recon,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--step", action="append", choices=sorted(STEPS), help="default: all")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 50 GPU, 3 CPU)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (default 10 GPU, 1 CPU)"
    )
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    for name in args.step or sorted(STEPS):
        with precision(args.precision):
            record = measure(
                name, STEPS[name], args.batch_size, device, steps, warmup, args.compile
            )
        record["precision"] = args.precision
        record["threads"] = torch.get_num_threads()
        tag = "" if args.precision == "auto" else f"-{args.precision}"
        print(
            f"{name}{tag}: full {record['full_images_per_s']:,.0f} img/s, bare "
            f"{record['bare_images_per_s']:,.0f} img/s, ratio {record['ratio']:.2f}"
        )
        common.write_result(
            record, args.results, f"{record['stamp']}-throughput-{name}{tag}-{device.type}"
        )


def measure(
    name: str,
    step: Step,
    batch: int,
    device: torch.device,
    steps: int,
    warmup: int,
    compile: bool,
    rounds: int = 2,
) -> dict[str, Any]:
    """Best images/s of each loop over ``rounds`` alternating rounds (bare, full, bare, full...),
    so that neither loop gains from running second."""
    loops = {mode: _make_loop(mode, step, batch, device, compile) for mode in ("bare", "full")}
    for run in loops.values():
        for i in range(warmup):
            run(i)
    rates = {mode: 0.0 for mode in loops}
    for r in range(rounds):
        for mode, run in loops.items():
            _sync(device)
            start = time.perf_counter()
            for i in range(steps):
                run(warmup + r * steps + i)
            _sync(device)
            rates[mode] = max(rates[mode], batch * steps / (time.perf_counter() - start))
    c, h, w = step.shape
    return {
        "kind": "throughput",
        "step": name,
        "network": step.network,
        "image": f"{c}×{h}×{w}",
        "batch_size": batch,
        "compile": compile,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "rounds": rounds,
        "full_images_per_s": round(rates["full"], 1),
        "bare_images_per_s": round(rates["bare"], 1),
        "ratio": round(rates["full"] / rates["bare"], 3),
        "commit": common.commit(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "stamp": common.stamp(),
        "command": common.command_line(),
        **common.machine(device),
    }


def _make_loop(
    mode: str, step: Step, batch: int, device: torch.device, compile: bool
) -> Callable[[int], None]:
    torch.manual_seed(0)
    net = compile_module(prepare(step.build(), device).train(), compile)
    opt = make_optimizer(
        step.optimizer,
        param_groups(net, step.weight_decay),
        step.lr,
        device,
        **({"momentum": 0.9} if step.optimizer == "sgd" else {}),
    )
    return (_full_loop if mode == "full" else _bare_loop)(step, net, opt, batch, device)


def _loss(step: Step, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction error for autoencoders, else the mean square of the output (the loss
    itself costs nothing next to the network; its gradient reaches every layer)."""
    with autocast(x.device):
        out = step.forward(net, x)
    return (out.float() - x).pow(2).mean() if out.shape == x.shape else out.float().pow(2).mean()


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def _bare_loop(
    step: Step, net: nn.Module, opt: torch.optim.Optimizer, batch: int, device: torch.device
) -> Callable[[int], None]:
    x = _layout(torch.rand(batch, *step.shape, device=device))

    def run(i: int) -> None:
        _update(opt, _loss(step, net, x))

    return run


def _full_loop(
    step: Step, net: nn.Module, opt: torch.optim.Optimizer, batch: int, device: torch.device
) -> Callable[[int], None]:
    images = np.random.default_rng(0).integers(0, 256, (batch * 20, *step.shape), dtype=np.uint8)
    data = DeviceImages(images, device)
    epochs: dict[int, list[torch.Tensor]] = {}

    def run(i: int) -> None:
        epoch, k = divmod(i, len(data) // batch)
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = data.epoch(batch, rng.key(0, epoch))
        idx = epochs[epoch][k]
        x = _layout(augment(to_float(data.take(idx)), step.view, rng.key(1, i)))
        _update(opt, _loss(step, net, x))

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
