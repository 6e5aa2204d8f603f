"""The training engine the deep methods share: data on the device, the step, checkpoints.

- ``DeviceImages`` puts the uint8 decode cache on the GPU once when it fits (with
  a margin), else in pinned host memory from which batches are copied
  asynchronously; batches are index tensors drawn with ``imgcluster.rng``.
- ``Trainer`` runs a method's phases (epochs of steps): it keeps loss sums on
  the device (one host synchronisation per epoch, none per step), shows one
  progress bar per phase with images/s and a recent loss, writes a
  ``train.log.jsonl`` line per epoch, saves checkpoints atomically, resumes
  from them, and stops cleanly at a step boundary on Ctrl-C.
- ``autocast``, ``make_optimizer`` and ``compile_module`` set up the step:
  bf16 autocast and fused optimisers on the GPU, plain fp32 on the CPU (bf16 there too
  inside ``precision("bf16")``, fp32 everywhere inside ``precision("fp32")``);
  ``GraphedStep`` replays a whole small-batch step as one CUDA graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import rng
from .atomic import atomic_path
from .report import Reporter
from .runs import CHECKPOINT

_AUTO_CHECKPOINT_S = 120.0  # default: a checkpoint at most this often, at epoch ends


# -- the step ---------------------------------------------------------------------------------


PRECISIONS = ("auto", "fp32", "bf16")
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("precision", default="auto")


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """The arithmetic ``autocast`` sets up inside this block: ``auto``, bf16 on CUDA and fp32
    on the CPU; ``bf16``, bf16 on the CPU too (the same arithmetic as on the GPU: ADC's
    training step on 28 px images runs twice as fast on a 2-core CPU with AMX); ``fp32``,
    fp32 everywhere."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def flush_denormals() -> None:
    """Treat subnormal floats (below 1.2e-38) as zero on the CPU, from now on, in this thread
    and in the intra-op threads it starts later: they inherit the setting when created, and
    those already running keep theirs. So the engine calls this when imported, before any
    parallel op has made torch's thread pool, and ``train`` again for a thread of its own.
    Adam's moments for weights whose gradients have died out decay into that range, where
    x86 arithmetic is many times slower: ADC on CIFAR-10 went from 50 s to 250 s a round on a
    2-core Xeon once 6% of its checkpoint's floats were subnormal, and a 2-thread matrix
    product of subnormals took 5.9 s against 0.09 s when only the calling thread flushed them
    (what a context around the fit gave once the pool existed). Values that small change
    nothing; TensorFlow flushes them in its threads too."""
    torch.set_flush_denormal(True)


flush_denormals()  # at import: before the first parallel op starts torch's thread pool


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing on the CPU (fp32 there), unless ``precision`` says
    otherwise."""
    mode = _PRECISION.get()
    if mode != "fp32" and (device.type == "cuda" or (mode == "bf16" and device.type == "cpu")):
        # no cache of cast weights: a step captured as a CUDA graph must not keep tensors
        # from its recording (PyTorch's advice); each weight is cast once per step anyway
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Clear the gradients, backpropagate ``loss``, update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def prepare(module: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device`` in channels-last memory, which convolutions run faster with on the
    GPU and on the CPU too (DEPICT's autoencoder at batch 100 on 2 cores: 1,432 img/s
    against 881)."""
    return module.to(device, memory_format=torch.channels_last)


def layout(x: torch.Tensor) -> torch.Tensor:
    """An image batch in the channels-last memory ``prepare`` gives the networks."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def compile_module(module: nn.Module, enabled: bool, mode: str | None = None) -> nn.Module:
    """``torch.compile`` when asked (``--compile``); the module itself otherwise."""
    return torch.compile(module, mode=mode) if enabled else module  # type: ignore[return-value]


def param_groups(
    module: nn.Module, weight_decay: float, decay_1d: bool = False
) -> list[dict[str, Any]]:
    """Two groups: weights with ``weight_decay``; biases and norm parameters (1-D) without,
    unless ``decay_1d``."""
    decay, plain = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or decay_1d else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def warm_up(device: torch.device, optimizers: bool) -> threading.Thread:
    """Pay, in a background thread, the one-off costs that would otherwise fall on the first
    training step: on a GPU its CUDA context, cuBLAS and cuDNN; with ``optimizers``, the
    import of ``torch._dynamo`` that torch's optimizers make when the first one is built
    (2.6 s of import, 1.6 s before the first epoch, on a 2-core CPU). ``train`` runs this
    while the images decode, in worker processes, and joins it before the fit starts, so
    that nothing else is imported at the same time as the fit's own imports."""

    def work() -> None:
        try:
            if optimizers:
                import torch._dynamo  # the import is the work
            if device.type == "cuda":
                x = torch.ones(1, 1, 4, 4, device=device)
                torch.nn.functional.conv2d(x, x[:, :, :3, :3])  # loads cuDNN
                (x[0, 0] @ x[0, 0]).sum().item()  # cuBLAS, and waits for the GPU
        except Exception:  # a head start only: any real fault shows again in the fit itself
            pass

    thread = threading.Thread(target=work, name="imgcluster-warm-up", daemon=True)
    thread.start()
    return thread


def make_optimizer(
    kind: str,
    params: Any,
    lr: float,
    device: torch.device,
    capturable: bool = False,
    **options: Any,
) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW; the fused CUDA implementation on the GPU, which ``capturable``
    (Adam, AdamW) keeps on the device throughout so a ``GraphedStep`` can capture it."""
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if kind not in classes:
        raise ValueError(f"optimizer must be one of {sorted(classes)}, got {kind!r}")
    if device.type == "cuda":
        options.setdefault("fused", True)
        if capturable and kind != "sgd":
            options["capturable"] = True
    opt = classes[kind](params, lr=lr, **options)
    if kind == "sgd" and options.get("fused") and options.get("momentum", 0):
        _start_momentum(opt)
        # a checkpoint may hold buffers for some parameters only (saved before a head stepped)
        opt.register_load_state_dict_post_hook(_start_momentum)
    return opt


def _start_momentum(opt: torch.optim.Optimizer) -> None:
    """Give every parameter a zero momentum buffer before the first step. PyTorch's fused SGD
    refuses a step in which some parameters with gradients have a buffer and others not yet
    (``expected Tensor ... but got NoneType``): MMDC's rotation and clustering steps share one
    optimiser but train different heads, so its first clustering step on the GPU failed. With
    no dampening a zero buffer gives the same update as none (``buf = grad`` either way)."""
    for group in opt.param_groups:
        if group["dampening"]:
            raise ValueError("fused SGD with momentum here needs dampening=0")
        for p in group["params"]:
            opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


class GraphedStep:
    """A training step ``fn(idx, *scalars) -> {name: tensor}`` replayed as one CUDA graph on
    the GPU.

    A step over a small batch is bound by kernel launches, not arithmetic: DEPICT's (batch
    100, 28 px) issues some 150 kernels of a few microseconds each, and the Python that
    launches them costs more than they do. Captured once, the whole step (gather, forward,
    backward, optimiser) is replayed with one launch. The first ``warmup`` calls run as
    ordinary code on a side stream (as CUDA graphs need: lazy initialisation happens
    there), the next one captures, and every later one copies its indices into the captured
    index tensor, refills the captured scalars and replays; the outputs are the same tensors
    each time, overwritten (copy the dict before changing it).

    ``scalars`` (a step's rng key, say) reach ``fn`` as 0-d tensors on the device (int64 for
    an int, float32 for a float), in eager calls too, so both run the same arithmetic; they
    are set with a fill, never a copy from host memory, which would wait for the GPU.

    What ``fn`` must do for that: read its batch only through ``idx`` and the images from
    resident ``DeviceImages``; keep every tensor it reads across steps at one address
    (update targets in place, never rebind them); use an optimiser made with
    ``capturable=True`` and a learning rate that does not change within the phase, or one
    held in a tensor that is refilled; no host synchronisation (``.item()``, ``.cpu()``,
    data-dependent shapes, tensors made from Python lists). Off the GPU, for a batch of
    another size (an epoch's short last one), or after a capture that failed (the reason is in
    ``fallback``), the step runs as ordinary code.
    """

    def __init__(
        self,
        fn: Callable[..., dict[str, torch.Tensor]],
        enabled: bool,
        warmup: int = 3,
    ) -> None:
        self.fn = fn
        self.enabled = enabled
        self.warmup = warmup
        self.fallback: str | None = None
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._idx: torch.Tensor | None = None
        self._scalars: list[torch.Tensor] = []
        self._out: dict[str, torch.Tensor] = {}

    def __call__(self, idx: torch.Tensor, *scalars: float) -> dict[str, torch.Tensor]:
        if self._graph is not None and self._idx is not None and len(idx) == len(self._idx):
            self._idx.copy_(idx)
            for held, value in zip(self._scalars, scalars, strict=True):
                held.fill_(value)
            self._graph.replay()
            return self._out
        args = [_scalar(v, idx.device) for v in scalars]
        if not self.enabled or self.fallback is not None or self._graph is not None:
            return self.fn(idx, *args)
        self._calls += 1
        if self._calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(idx, *args)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._capture(idx, args)

    def status(self) -> str:
        """For the training log: ``replayed``, ``eager`` (not captured yet) or why it failed."""
        if self.fallback is not None:
            return f"failed, eager: {self.fallback}"
        return "replayed" if self._graph is not None else "eager"

    def _capture(self, idx: torch.Tensor, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Record the step with ``idx`` and ``args`` as its inputs, then replay it once for
        this batch (nothing runs while a graph is being recorded)."""
        self._idx, self._scalars = idx.clone(), args
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._out = self.fn(self._idx, *self._scalars)
        except RuntimeError as error:  # an operation CUDA graphs cannot hold
            self.fallback = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            torch.cuda.synchronize()
            return self.fn(idx, *[_scalar(a.item(), idx.device) for a in args])
        self._graph = graph
        graph.replay()
        return self._out


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A step's scalar input as a 0-d tensor on ``device``, made by a fill (no host copy)."""
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    return torch.full((), value, dtype=dtype, device=device)


def hold_lr(opt: torch.optim.Optimizer) -> None:
    """Hold each group's learning rate in a 0-d tensor on its parameters' device, so a step
    captured as a CUDA graph reads the value ``set_lr`` leaves there (a float would be frozen
    into the graph). Call it before the first step, and again after a resume has restored
    the optimiser (the checkpoint keeps the value as a number)."""
    for group in opt.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            device = group["params"][0].device
            group["lr"] = torch.full((), float(group["lr"]), device=device)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; one held in a tensor (for a captured step) is
    refilled in place, so the graph that reads it sees the new value."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# -- data on the device -----------------------------------------------------------------------


class DeviceImages:
    """The decoded images (uint8 N×C×H×W) where the training step can reach them quickly.

    On a GPU the array is copied to device memory when it takes at most ``margin`` of the
    free memory; otherwise it stays in pinned host memory and each batch is gathered there
    and copied asynchronously (two alternating buffers). On the CPU it is read into RAM.
    """

    def __init__(self, images: np.ndarray, device: torch.device, margin: float = 0.5) -> None:
        self.device = device
        self.n = len(images)
        self.shape = tuple(images.shape[1:])
        on_gpu = (
            device.type == "cuda" and images.nbytes <= margin * torch.cuda.mem_get_info(device)[0]
        )
        target = device if on_gpu else torch.device("cpu")
        pin = device.type == "cuda" and not on_gpu
        self.data = torch.empty(
            (self.n, *self.shape), dtype=torch.uint8, device=target, pin_memory=pin
        )
        for start in range(
            0, self.n, 65536
        ):  # in blocks: a memory map is never read whole into RAM
            block = torch.from_numpy(np.array(images[start : start + 65536]))
            self.data[start : start + len(block)].copy_(block)
        # by where the data went, not by comparing devices: torch.device("cuda") != "cuda:0"
        self.resident = on_gpu or device.type == "cpu"
        self.index_device = self.data.device
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._turn = 0

    def __len__(self) -> int:
        return self.n

    @property
    def graphable(self) -> bool:
        """Whether a step over these images can be replayed as a CUDA graph (``GraphedStep``):
        on the GPU, with the images in its memory, where a step's gather is a device op."""
        return self.device.type == "cuda" and self.resident

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The images at ``idx`` (on ``index_device``), as a uint8 tensor on the training device."""
        if self.resident:
            return self.data.index_select(0, idx)
        buf = self._buffer(len(idx))
        torch.index_select(self.data, 0, idx, out=buf)
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._buffers[self._turn] = (self._buffers[self._turn][0], event)
        return out

    def _buffer(self, n: int) -> torch.Tensor:
        """A pinned buffer whose previous copy to the GPU has finished."""
        self._turn = (self._turn + 1) % 2
        while len(self._buffers) < 2:
            self._buffers.append(
                (torch.empty((0, *self.shape), dtype=torch.uint8).pin_memory(), None)
            )
        buf, event = self._buffers[self._turn]
        if event is not None:
            event.synchronize()  # the copy from two batches ago; long finished in practice
        if len(buf) < n:
            buf = torch.empty((n, *self.shape), dtype=torch.uint8).pin_memory()
            self._buffers[self._turn] = (buf, None)
        return buf[:n]

    def epoch(
        self, batch_size: int, k: int, drop_last: bool = True, subset: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The batches of one epoch over every image (or over ``subset``, indices on
        ``index_device``): a random permutation (keyed, same on any device), split."""
        if subset is None:
            order = rng.permutation(self.n, k, self.index_device)
        else:
            order = subset[rng.permutation(len(subset), k, subset.device)]
        batches = list(order.split(batch_size))
        if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
            batches.pop()
        return batches

    def in_order(self, batch_size: int) -> list[torch.Tensor]:
        """Batches covering every image once, in order (for embedding the whole set)."""
        return list(torch.arange(self.n, device=self.index_device).split(batch_size))


@torch.no_grad()
def map_batches(
    data: DeviceImages, batch_size: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``fn`` (uint8 batch -> tensor) over every image in order, concatenated, in float32."""
    with autocast(data.device):
        return torch.cat([fn(data.take(idx)).float() for idx in data.in_order(batch_size)])


# -- checkpoints ------------------------------------------------------------------------------


class Checkpointer:
    """One ``checkpoint.safetensors`` in the run folder: tensors + a JSON description in its
    metadata, so model, optimiser and progress are always replaced together, atomically."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / CHECKPOINT

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(self.path) as tmp:
            save_file(flat, str(tmp), metadata={"imgcluster": json.dumps(meta)})

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if not self.exists():
            return None
        with safe_open(str(self.path), "pt") as fh:
            meta = json.loads((fh.metadata() or {})["imgcluster"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
        return tensors, meta

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _optimizer_to_flat(
    name: str, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    # a learning rate held in a tensor (set_lr) is saved as its value; hold_lr puts it back
    groups = [
        {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_flat(
    name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, entry = key[len(prefix) :].split("/", 1)
            state.setdefault(int(pid), {})[entry] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    # JSON turned tuples (Adam's betas) into lists; give them back their type
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    opt.load_state_dict({"state": state, "param_groups": groups})


# -- the trainer ------------------------------------------------------------------------------


class Trainer:
    """Runs the epochs of a method's phases; see the module docstring.

    A method builds its modules, then::

        trainer = Trainer(ctx, {"net": net})            # restores them when resuming
        for epoch in trainer.phase("pretrain", epochs, {"adam": opt}):
            for idx in trainer.steps(data.epoch(batch, trainer.key(epoch))):
                ...; trainer.record(len(idx), loss=loss, recon=recon)
        if trainer.entering("cluster"):                  # skipped when resuming past this point
            ...  # one-off work whose result lives in the modules or in trainer.extra

    Everything random must be keyed by ``trainer.key(...)`` (or be torch's global RNG,
    whose state is checkpointed) so that a resumed run matches an uninterrupted one.
    """

    def __init__(self, ctx: Any, modules: dict[str, nn.Module]) -> None:
        self.ctx = ctx
        self.device: torch.device = ctx.device
        self.modules = modules
        self.extra: dict[str, torch.Tensor] = {}
        self.done: list[str] = []  # finished phases
        self.current: str | None = None
        self.epoch = 0  # epochs finished in the current phase
        self.step = 0  # steps finished in the current epoch
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        # the optimizers a phase ran with in this process (weak: a finished phase's may go)
        self._live: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._sums: dict[str, torch.Tensor] = {}
        self._images = 0
        self._stop = threading.Event()
        self._last_save = time.monotonic()
        # log lines say when they were written, counted from the start of the fit
        self._born = getattr(ctx, "started", time.perf_counter())
        self._note: dict[str, Any] = {}
        self._shown: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self._finish = False
        self._resume = self._load()

    # -- phases and steps

    def key(self, *parts: int) -> int:
        """An rng key unique to this run, phase and ``parts`` (epoch, step, view...)."""
        return rng.key(self.ctx.seed, _phase_id(self.current or ""), *parts)

    def entering(self, phase: str) -> bool:
        """True when ``phase`` has not started yet (its one-off set-up should run)."""
        return phase not in self.done and phase != self.current

    def phase(
        self,
        name: str,
        epochs: int,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        steps_per_epoch: int | None = None,
        images_per_step: float = 0,
    ) -> Iterator[int]:
        """Yield the epochs of phase ``name`` still to run (none if it is finished)."""
        if name in self.done:
            return
        self._optimizers = dict(optimizers or {})
        self._live.update(self._optimizers.values())
        resuming = self.current == name
        if resuming:
            self._restore_optimizers(self._optimizers)
        else:
            self.current, self.epoch, self.step = name, 0, 0
        total = epochs * (steps_per_epoch or 1) * max(images_per_step, 1)
        reporter: Reporter = self.ctx.reporter
        with reporter.task(name, total=total) as bar, self._interruptible():
            self._bar = bar
            bar.advance(self.epoch * (steps_per_epoch or 1) * max(images_per_step, 1))
            self._finish = False
            while self.epoch < epochs and not self._finish:
                started, images_before = time.perf_counter(), self._images
                yield self.epoch
                self._end_epoch(started, self._images - images_before)
        self.done.append(name)
        self.current, self.epoch, self.step = None, 0, 0
        self._save()

    def carry_over(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Optimizers that go on from the phase just finished into the next (call between
        the two): when this process resumed after that phase, so never stepped them, load
        the state the phase left them in from the checkpoint. (Not told by an empty state: a
        fused SGD with momentum has zero buffers before its first step.)"""
        self._restore_optimizers({n: o for n, o in optimizers.items() if o not in self._live})

    def steps(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The batches of this epoch not yet done (a resumed epoch skips the finished ones)."""
        for idx in batches[self.step :]:
            if self._stop.is_set():
                self._save()
                raise KeyboardInterrupt
            yield idx
            self.step += 1

    def record(self, images: int, **terms: torch.Tensor) -> None:
        """Add this step's loss terms (kept on the device, summed) and its image count."""
        self._images += images
        for name, value in terms.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._bar.advance(images)
        if "loss" in terms:
            self._show_loss(terms["loss"])

    def epoch_sum(self, name: str) -> float:
        """The sum of ``name`` over this epoch's recorded steps, those before a resume included
        (the sums are checkpointed with the epoch)."""
        return self._sums[name].item() if name in self._sums else 0.0

    def _show_loss(self, loss: torch.Tensor) -> None:
        """Put a recent loss in the progress bar without waiting for the GPU: the value is
        copied to pinned memory in the background and shown once the copy has landed."""
        if self.device.type != "cuda":
            self._bar.info(f"loss {loss.item():.4g}")  # free on the CPU: nothing to wait for
            return
        if self._shown is not None and self._shown[1].query():
            self._bar.info(f"loss {self._shown[0].item():.4g}")
            self._shown = None
        if self._shown is None:
            pinned = torch.empty((), dtype=torch.float32, pin_memory=True)
            pinned.copy_(loss.detach().float(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._shown = (pinned, event)

    def finish_phase(self) -> None:
        """End the current phase after this epoch (a method's own stopping rule)."""
        self._finish = True

    def note(self, **fields: Any) -> None:
        """Extra fields for this epoch's log line (cluster sizes, learning rate...)."""
        self._note.update(fields)

    def log(self, record: dict[str, Any]) -> None:
        """Write ``record`` to the training log with ``elapsed``: the seconds since the fit
        began (in this process), so the gaps between lines show the set-up, captures and
        one-off passes that no epoch counts."""
        self.ctx.log({**record, "elapsed": round(time.perf_counter() - self._born, 3)})

    def _end_epoch(self, started: float, images: int) -> None:
        steps = max(self.step, 1)
        means = {k: v.item() / steps for k, v in self._sums.items()}  # the one sync per epoch
        # the clock is read after that sync, so the epoch's seconds hold the GPU work it
        # queued: read before, AE-CM's replayed pretraining epochs showed 0.01 s each on the
        # H100, and their 0.1 s of GPU time fell in the gap before the next epoch
        seconds = time.perf_counter() - started
        self.epoch += 1
        record = {
            "phase": self.current,
            "epoch": self.epoch,
            **means,
            "images": images,
            "seconds": round(seconds, 3),
            "images_per_s": round(images / max(seconds, 1e-9), 1),
            **self._note,
        }
        self.log(record)
        if "loss" in means:
            self._bar.info(f"loss {means['loss']:.4g}")
        self._sums, self._note, self.step = {}, {}, 0
        every = getattr(self.ctx, "checkpoint_every", 0)
        due = (
            self.epoch % every == 0
            if every
            else time.monotonic() - self._last_save > _AUTO_CHECKPOINT_S
        )
        if due:
            self._save()

    # -- checkpoints

    def _save(self) -> None:
        checkpointer: Checkpointer | None = getattr(self.ctx, "checkpoint", None)
        if checkpointer is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            for key, value in module.state_dict().items():
                tensors[f"module/{name}/{key}"] = value
        optim_meta = {}
        for name, opt in self._optimizers.items():
            flat, optim_meta[name] = _optimizer_to_flat(name, opt)
            tensors.update(flat)
        tensors.update({f"extra/{k}": v for k, v in self.extra.items()})
        tensors.update({f"sums/{k}": v for k, v in self._sums.items()})
        tensors["rng/cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "done": self.done,
            "current": self.current,
            "epoch": self.epoch,
            "step": self.step,
            "images": self._images,
            "optimizers": optim_meta,
        }
        checkpointer.save(tensors, meta)
        self._last_save = time.monotonic()

    def _load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        checkpointer: Checkpointer | None = getattr(self.ctx, "checkpoint", None)
        loaded = checkpointer.load() if checkpointer is not None and self.ctx.resume else None
        if loaded is None:
            return None
        tensors, meta = loaded
        for name, module in self.modules.items():
            prefix = f"module/{name}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(state)
        self.extra = {
            k[6:]: v.to(self.device) for k, v in tensors.items() if k.startswith("extra/")
        }
        self._sums = {k[5:]: v.to(self.device) for k, v in tensors.items() if k.startswith("sums/")}
        torch.set_rng_state(tensors["rng/cpu"])
        if "rng/cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        self.done, self.current = list(meta["done"]), meta["current"]
        self.epoch, self.step, self._images = meta["epoch"], meta["step"], meta["images"]
        return tensors, meta

    def _restore_optimizers(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if self._resume is None:
            return
        tensors, meta = self._resume
        for name, opt in optimizers.items():
            if name in meta["optimizers"]:
                _optimizer_from_flat(name, opt, tensors, meta["optimizers"][name])

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """The first Ctrl-C asks for a stop at the next step boundary; a second one stops now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def ask_to_stop(signum: int, frame: Any) -> None:
            self._stop.set()
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, ask_to_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _phase_id(name: str) -> int:
    return rng.key(*name.encode()) if name else 0
