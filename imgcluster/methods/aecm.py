"""AE-CM: an autoencoder with a clustering module (Boubekki, Kampffmeyer, Jenssen, Brefeld,
Machine Learning 110, 2021; arXiv 2012.03740).

An MLP autoencoder (D-500-500-2000-d) maps each image to a code z. The clustering module
(CM) on the code is a one-hidden-layer autoencoder whose loss equals a GMM-like soft k-means
objective: soft assignments γ = softmax(W z), a reconstruction of z from γ and the centroids
u_k, a sparsity term pushing γ to one-hot, an orthonormality penalty keeping centroids apart,
and a Dirichlet prior on the cluster weights keeping clusters from emptying. Everything is
trained jointly with the autoencoder's reconstruction. Read-out: argmax γ, i.e. the largest
inner product of z with the rows of W.

Losses are normalised per sample (means over the batch and the code's dimensions, as in the
authors' PyTorch example), so the weights do not depend on the batch size. The defaults are the
authors' published MNIST run (their TensorFlow code, ``Tuned_Param.py``: batch 500, β = 5, α =
230, λ = 1 on a loss summed over the batch, Adam with ε = 1e-3, 1000 epochs) rewritten for the
normalised loss: dividing it by n·d (n = 500 images, d = 10 code dimensions) gives β·D/d = 392
on the pixel-mean reconstruction, α = 1 + 229/(n·d) = 1.0458, λ = 1/(n·d) = 2e-4 and, because
Adam is blind to the loss's scale but not to ε, ε = 1e-3/(n·d) = 2e-7. The later PyTorch
example's settings (β = 100, α = 1.1, λ = 0.1 squared, ε = 1e-3 on the normalised loss, AdamW
weight decay 0.01) are not the paper's: its ε = 1e-3 against gradients thousands of times
smaller than the TF code's damps every Adam step (see docs/methods.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from scipy import optimize
from torch import nn

from ..engine import (
    DeviceImages,
    GraphedStep,
    Trainer,
    hold_lr,
    make_optimizer,
    map_batches,
    optimizer_step,
    prepare,
    set_lr,
)
from ..errors import UsageError
from ..model import ClusterModel, Preprocessing, register_embedder
from ..nets import MLPAutoencoder
from . import register
from .acpic import acpic, compile_ahead
from .base import FitContext, Method
from .kmeans import faiss_kmeans

# -- loss terms (γ: N×K soft assignments, z: N×d codes, u: K×d centroids) --------------------


def cm_reconstruction(z: torch.Tensor, z_tilde: torch.Tensor) -> torch.Tensor:
    """E1 = Σ_i ‖z_i − z̃_i‖² / (n·d), with z̃_i = Σ_k γ_ik u_k."""
    return (z - z_tilde).pow(2).sum() / z.numel()


def cm_sparsity(gamma: torch.Tensor, d: int) -> torch.Tensor:
    """E2 = Σ_i Σ_k γ_ik (1 − γ_ik) / (n·d): zero only for one-hot assignments."""
    return (gamma * (1 - gamma)).sum() / (gamma.shape[0] * d)


def orthonormality(u: torch.Tensor, norm: Literal["l1", "l2"] = "l1") -> torch.Tensor:
    """E3 = Σ_{k,l} |u_kᵀ u_l − δ_kl| (the TF code; ``l2``: squared, the PyTorch example):
    centroids kept orthonormal, which replaces the plain CM's merging term."""
    eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
    gap = u @ u.T - eye
    return gap.abs().sum() if norm == "l1" else gap.pow(2).sum()


def dirichlet_prior(gamma: torch.Tensor, alpha: float) -> torch.Tensor:
    """E4 = Σ_k (1 − α) log γ̄_k, γ̄_k = (1/n) Σ_i γ_ik: for α > 1 it penalises emptying clusters."""
    return ((1 - alpha) * torch.log(gamma.mean(0) + 1e-10)).sum()


def cm_sparsity_weighted(gamma: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E2 of the plain CM: Σ_k (Σ_i γ_ik (1 − γ_ik)) ‖u_k‖² / (n·d)."""
    return ((gamma * (1 - gamma)).sum(0) * u.pow(2).sum(1)).sum() / (gamma.shape[0] * u.shape[1])


def cm_merging(gamma: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E3 of the plain CM: −Σ_{k≠l} (Σ_i γ_ik γ_il) u_kᵀ u_l / (n·d)."""
    k = u.shape[0]
    mask = 1 - torch.eye(k, device=u.device, dtype=u.dtype)
    return -((gamma.T @ gamma) * (u @ u.T) * mask).sum() / (gamma.shape[0] * u.shape[1])


def ae_reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The autoencoder's reconstruction error, mean over pixels: (1/nD) Σ ‖x_i − x̂_i‖²."""
    return (x - x_hat).pow(2).mean()


# -- modules ----------------------------------------------------------------------------------


class ClusteringModule(nn.Module):
    """γ = softmax(W z + b) (K units); z̃ = γ U + c; centroid u_k = U_k + c (the TF code's CM,
    Glorot weights; the PyTorch example drops both biases)."""

    def __init__(self, d: int, k: int, bias: bool = True) -> None:
        super().__init__()
        self.gamma = nn.Linear(d, k, bias=bias)
        self.mu = nn.Linear(k, d, bias=bias)
        for layer in (self.gamma, self.mu):
            nn.init.xavier_uniform_(layer.weight)
            if bias:
                nn.init.zeros_(layer.bias)

    @property
    def centroids(self) -> torch.Tensor:
        """u_k = μ(e_k): the decoder's image of the one-hot vectors, K×d."""
        u = self.mu.weight.T
        return u + self.mu.bias if self.mu.bias is not None else u

    def read_out(self) -> torch.Tensor:
        """The rows [W | b] that score an embedding [z, 1] by inner product: argmax γ."""
        w = self.gamma.weight.detach()
        if self.gamma.bias is None:
            return w
        return torch.cat([w, self.gamma.bias.detach()[:, None]], dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma = torch.softmax(self.gamma(z), dim=1)
        return gamma, self.mu(gamma)


@register_embedder
class AECMEmbedder(nn.Module):
    """uint8 images -> pixels / 255, flattened -> the AE-CM encoder's code z, with a constant 1
    appended when the clustering module has a bias (so argmax γ is an inner-product search)."""

    def __init__(self, in_dim: int, code_dim: int, hidden: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_dim, self.code_dim, self.hidden, self.bias = in_dim, code_dim, list(hidden), bias
        self.encoder = MLPAutoencoder(in_dim, code_dim, tuple(hidden)).encoder

    def spec(self) -> dict[str, object]:
        return {
            "in_dim": self.in_dim,
            "code_dim": self.code_dim,
            "hidden": self.hidden,
            "bias": self.bias,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x.flatten(1).float() / 255.0)
        return torch.cat([z, torch.ones_like(z[:, :1])], dim=1) if self.bias else z


# -- the method -------------------------------------------------------------------------------


@dataclass
class AECMConfig:
    """Defaults: the authors' MNIST run (TF code) on the normalised loss (module docstring),
    except init (pre, AC-PIC) and beta (docs/methods.md)."""

    # rand: all jointly from scratch; pre: AE pretraining + a clustering of its codes first
    init: Literal["rand", "pre"] = "pre"
    # init=pre: how the pretrained codes are clustered; the authors use k-means, which cuts the
    # digit manifolds (MNIST: 0.78 against AC-PIC's 0.97 on the same codes, docs/methods.md)
    pre_clustering: Literal["acpic", "kmeans"] = "acpic"
    epochs: int = 1000  # joint training
    batch_size: int = 500
    code_dim: int = 0  # size of the code z; 0 = K (the authors: 10 for MNIST)
    alpha: float = 1.0458  # Dirichlet concentration (> 1 keeps clusters populated)
    # weight of the autoencoder's reconstruction (pixel mean); 0 = by init: 392 for rand (the
    # authors' MNIST run; far less lets the codes collapse from a random start), 3.92 for pre:
    # from the AC-PIC start 392 erodes the initial clustering (USPS-11k dev: 0.88 -> 0.70 in
    # 200 epochs) while 3.92 refines it (0.88 -> 0.89), see docs/methods.md
    beta: float = 0.0
    lbd: float = 2e-4  # weight of the centroid orthonormality penalty
    orth: Literal["l1", "l2"] = "l1"  # its form: |·| (TF code) or squared (PyTorch example)
    bias: bool = True  # the clustering module's biases (TF code; the PyTorch example has none)
    lr: float = 1e-3
    eps: float = 2e-7  # Adam's ε: the authors' 1e-3 on a loss n·d = 5000 times larger
    weight_decay: float = 0.0  # plain Adam, as the TF code
    average: bool = True  # a final epoch whose weights are averaged over its steps
    # stop the joint phase once fewer than this fraction of the images changed cluster (argmax
    # γ during the epoch) since the previous epoch: DEC/IDEC's rule and 0.1%; 0 = all epochs
    tol: float = 0.001
    # an epoch whose mean loss is more than this many times the previous epoch's is undone and
    # the learning rate halved (Adam with the tiny ε blew up once converged: USPS-11k, epoch
    # 348, loss 1.2 -> 30,841, every image in one cluster); 0 = off
    rollback: float = 10.0
    pretrain_epochs: int = 100  # init=pre: AE pretraining
    # init=pre: the clustering module alone on the pretrained codes (the authors: 100); 0
    # because the hand-over already starts it at the k-means fit's mixture posterior, and the
    # plain CM loss grows the centroids away from orthonormal (Σ|uuᵀ − I| 0 → 718 on USPS)
    cm_epochs: int = 0
    pretrain_optimizer: Literal["sgd", "adam"] = "adam"  # init=pre: AE pretraining
    cuda_graphs: bool = True  # on the GPU, replay each step as one CUDA graph (same arithmetic)

    @property
    def reconstruction_weight(self) -> float:
        """β, with 0 resolved by ``init``."""
        return self.beta or (392.0 if self.init == "rand" else 3.92)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "pretrain_epochs", "cm_epochs"):
            if getattr(self, name) < 0 or (name == "batch_size" and self.batch_size < 1):
                raise UsageError(f"parameter {name} must be >= {1 if name == 'batch_size' else 0}")
        if self.code_dim < 0:
            raise UsageError("parameter code_dim must be >= 0 (0 means K)")
        if self.beta < 0 or self.lbd < 0 or self.lr <= 0 or self.eps <= 0:
            raise UsageError("parameters beta, lbd must be >= 0 and lr, eps > 0")
        if self.rollback != 0 and self.rollback <= 1:
            raise UsageError(f"parameter rollback must be 0 (off) or > 1, not {self.rollback}")
        if not 0 <= self.tol < 1:
            got = self.tol
            raise UsageError(f"parameter tol must be in [0, 1) (a fraction of images), not {got}")
        if self.pretrain_optimizer not in ("sgd", "adam"):
            got = self.pretrain_optimizer
            raise UsageError(f"parameter pretrain_optimizer must be 'sgd' or 'adam', not {got!r}")
        if self.orth not in ("l1", "l2"):
            raise UsageError(f"parameter orth must be 'l1' or 'l2', not {self.orth!r}")
        if self.init not in ("rand", "pre"):
            raise UsageError(f"parameter init must be 'rand' or 'pre', not {self.init!r}")
        if self.pre_clustering not in ("acpic", "kmeans"):
            got = self.pre_clustering
            raise UsageError(f"parameter pre_clustering must be 'acpic' or 'kmeans', not {got!r}")


@register
class AECM(Method):
    name = "aecm"
    summary = "AE-CM (Boubekki et al. 2021): MLP autoencoder + GMM-like clustering module"
    Config = AECMConfig

    def fit(self, images: np.ndarray, ctx: FitContext) -> ClusterModel:
        cfg: AECMConfig = self.config
        n, c, h, w = images.shape
        self.check_count(n)
        d = cfg.code_dim or self.k
        data = DeviceImages(images, ctx.device)
        ae = prepare(MLPAutoencoder(c * h * w, d), ctx.device)
        cm = prepare(ClusteringModule(d, self.k, cfg.bias), ctx.device)
        trainer = Trainer(ctx, {"ae": ae, "cm": cm})
        batch = min(cfg.batch_size, n)
        if cfg.init == "pre":
            # AC-PIC's numba code compiles in a child process while the autoencoder pretrains
            ahead = cfg.pre_clustering == "acpic" and trainer.entering("cm")
            with compile_ahead(ahead):
                self._pretrain(trainer, data, ae, cm, batch)
        opt = make_optimizer(
            "adamw",
            list(ae.parameters()) + list(cm.parameters()),
            cfg.lr,
            ctx.device,
            capturable=self._graphs(data),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        self._joint("joint", cfg.epochs, trainer, data, ae, cm, opt, batch)
        if cfg.average:
            self._joint("average", 1, trainer, data, ae, cm, opt, batch, average=True)
        embedder = AECMEmbedder(c * h * w, d, [500, 500, 2000], cfg.bias).to(ctx.device)
        embedder.encoder.load_state_dict(ae.encoder.state_dict())
        return ClusterModel(
            embedder, cm.read_out(), "ip", Preprocessing(h, c), self.name, asdict(cfg)
        )

    def _graphs(self, data: DeviceImages) -> bool:
        """CUDA graphs for the steps: on the GPU with the images in its memory, unless off.
        Eager, a step of the small MLP launches some hundred kernels and is bound by the
        Python launching them (2.9 ms a pretraining step, 5.2 ms a joint one on an H200)."""
        return self.config.cuda_graphs and data.graphable

    def _joint(
        self,
        phase: str,
        epochs: int,
        trainer: Trainer,
        data: DeviceImages,
        ae: MLPAutoencoder,
        cm: ClusteringModule,
        opt: torch.optim.Optimizer,
        batch: int,
        average: bool = False,
    ) -> None:
        """Autoencoder and clustering module together, until fewer than ``tol`` of the images
        change cluster in an epoch; with ``average``, one epoch whose parameters are averaged
        over its steps (the authors' final "averaging epoch", eager: the average's weight
        changes every step). The labels and cluster counts are updated in place, so a
        captured step keeps writing to the current ones."""
        cfg: AECMConfig = self.config
        beta = cfg.reconstruction_weight
        params = [*ae.parameters(), *cm.parameters()]
        steps = -(-data.n // batch)
        if "labels" not in trainer.extra:  # argmax γ of each image when it was last seen
            trainer.extra["labels"] = torch.full((data.n,), -1, device=trainer.device)
        labels = trainer.extra["labels"]
        clusters = torch.arange(self.k, device=trainer.device)
        counts = torch.zeros(self.k, dtype=torch.int64, device=trainer.device)

        def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            x = data.take(idx).flatten(1).float() / 255.0
            z = ae(x)
            gamma, z_tilde = cm(z)
            terms = {
                "rec": ae_reconstruction(x, ae.reconstruct(z)),
                "e1": cm_reconstruction(z, z_tilde),
                "e2": cm_sparsity(gamma, z.shape[1]),
                "e3": orthonormality(cm.centroids, cfg.orth),
                "e4": dirichlet_prior(gamma, cfg.alpha),
            }
            loss = (
                beta * terms["rec"]
                + terms["e1"]
                + terms["e2"]
                + cfg.lbd * terms["e3"]
                + terms["e4"]
            )
            optimizer_step(opt, loss)
            assigned, rows = gamma.detach().argmax(1), idx.to(labels.device)
            moved = (labels[rows] != assigned).sum()
            labels[rows] = assigned
            # images per cluster by comparison: bincount would wait for the GPU
            counts.add_((assigned[:, None] == clusters).sum(0))
            return {"loss": loss, "moved": moved, **terms}

        graphs = self._graphs(data) and not average
        run = GraphedStep(step, graphs)
        guarded = bool(cfg.rollback) and not average
        last: _Snapshot | None = None
        for epoch in trainer.phase(phase, epochs, {"adamw": opt}, steps, batch):
            if guarded and last is None:  # the phase's start (a resume restored it by now)
                last = _Snapshot(math.inf, [p.detach().clone() for p in params], _moments(opt))
            if graphs:
                hold_lr(opt)  # before the capture; again after a resume restored a number
            counts.zero_()
            for idx in trainer.steps(data.epoch(batch, trainer.key(epoch), drop_last=False)):
                terms = run(idx)
                if average:
                    _running_mean(trainer, params, trainer.step)
                trainer.record(len(idx), **terms)
            if graphs:
                trainer.note(cuda_graph=run.status())
            # from the trainer's sums, which a resume mid-epoch keeps (local ones would restart)
            if guarded and last is not None:
                mean_loss = trainer.epoch_sum("loss") / steps
                last = _guard(last, mean_loss, cfg.rollback, params, opt, trainer)
            change = trainer.epoch_sum("moved") / data.n  # the first epoch: 1 (no labels before)
            trainer.note(label_change=change, sizes=counts.tolist())
            if change < cfg.tol and not average:
                trainer.finish_phase()
        if average and "avg/0" in trainer.extra:
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.copy_(trainer.extra[f"avg/{i}"])

    def _pretrain(
        self,
        trainer: Trainer,
        data: DeviceImages,
        ae: MLPAutoencoder,
        cm: ClusteringModule,
        batch: int,
    ) -> None:
        """init=pre: AE pretraining, k-means on the codes handed over to the clustering module
        (``_hand_over``), then the clustering module alone on the fixed codes."""
        cfg: AECMConfig = self.config
        steps = -(-data.n // batch)
        graphs = self._graphs(data)
        if cfg.pretrain_optimizer == "sgd":  # the authors' AE.py
            opt = make_optimizer("sgd", ae.parameters(), 0.01, trainer.device, momentum=0.9)
        else:
            opt = make_optimizer("adam", ae.parameters(), 1e-3, trainer.device, capturable=graphs)

        def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            x = data.take(idx).flatten(1).float() / 255.0
            loss = ae_reconstruction(x, ae.reconstruct(ae(x)))
            optimizer_step(opt, loss)
            return {"loss": loss}

        run = GraphedStep(step, graphs)
        for epoch in trainer.phase("pretrain", cfg.pretrain_epochs, {"opt": opt}, steps, batch):
            for idx in trainer.steps(data.epoch(batch, trainer.key(epoch), drop_last=False)):
                trainer.record(len(idx), **run(idx))
            if graphs:
                trainer.note(cuda_graph=run.status())
        if trainer.entering("cm"):
            start = time.perf_counter()
            z = map_batches(data, 4096, lambda b: ae(b.flatten(1).float() / 255.0))
            timings: dict[str, object] = {}
            labels, centres = _initial_clustering(
                z, self.k, cfg.pre_clustering, trainer.ctx.seed, timings
            )
            clustered = time.perf_counter()
            trainer.extra["codes"] = _hand_over(ae, cm, z, labels, centres)
            agree = (cm(trainer.extra["codes"])[0].argmax(1) == labels).float().mean().item()
            # how far argmax γ reproduces the initial clustering (label-free): 1 for k-means
            trainer.log(
                {
                    "phase": "hand-over",
                    "clustering": cfg.pre_clustering,
                    "agreement": agree,
                    "clustering_seconds": round(clustered - start, 3),
                    "seconds": round(time.perf_counter() - start, 3),
                    **timings,
                }
            )
        z = trainer.extra.get("codes")  # absent when resuming past the "cm" phase
        adam = make_optimizer(
            "adamw",
            cm.parameters(),
            cfg.lr,
            trainer.device,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        for epoch in trainer.phase("cm", cfg.cm_epochs, {"adamw": adam}, steps, batch):
            for idx in trainer.steps(data.epoch(batch, trainer.key(epoch), drop_last=False)):
                zb = z[idx.to(z.device)]
                gamma, z_tilde = cm(zb)
                u = cm.centroids
                loss = (
                    cm_reconstruction(zb, z_tilde)
                    + cm_sparsity_weighted(gamma, u)
                    + cm_merging(gamma, u)
                    + dirichlet_prior(gamma, cfg.alpha)
                )
                optimizer_step(adam, loss)
                trainer.record(len(idx), loss=loss)
        trainer.extra.pop("codes", None)


def _initial_clustering(
    z: torch.Tensor, k: int, how: str, seed: int, timings: dict[str, object] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """init=pre: labels and centres (K×d) of the pretrained codes: k-means (the authors' choice;
    FAISS, 20 restarts, the lowest objective kept) or AC-PIC (the centres are its clusters'
    means), which follows the manifolds that k-means cuts across. AC-PIC's ``timings`` go
    into the given dict."""
    if how == "kmeans":
        km = faiss_kmeans(z.cpu().numpy(), k, seed=seed, epochs=100, restarts=20)
        labels, centres = torch.from_numpy(km.labels), torch.from_numpy(km.centroids)
    else:
        labels = torch.from_numpy(acpic(z, k, timings=timings)).long()  # K-NN where z is
        centres = torch.zeros(k, z.shape[1]).index_add_(0, labels, z.cpu().float())
        centres /= torch.bincount(labels, minlength=k).clamp_min(1)[:, None]
    return labels.to(z.device), centres.to(z)


@torch.no_grad()
def _hand_over(
    ae: MLPAutoencoder,
    cm: ClusteringModule,
    z: torch.Tensor,
    labels: torch.Tensor,
    mu: torch.Tensor,
) -> torch.Tensor:
    """init=pre: from the pretrained codes ``z``, their initial clustering ``labels`` and its
    centres ``mu`` (K×d), an affine change of the code's coordinates that makes the K centres
    orthonormal (the unit vectors), with its origin where that is best conditioned
    (``_best_origin``), applied to the encoder's last layer and undone in the decoder's first,
    so the autoencoder computes the same function; the clustering module
    starts with centroids = unit vectors and γ = the Gaussian-mixture posterior of the centres
    (for k-means: exactly its labels), refined by logistic regression towards ``labels`` when it
    disagrees with them (AC-PIC's clusters are not the centres' Voronoi cells). The authors set
    μ = centres, W = pinv(centres), which leaves the orthonormality penalty far from zero and γ
    nearly uniform: on USPS that start collapsed to one cluster. Returns the codes in the new
    coordinates."""
    m = _best_origin(mu)
    a_inv = _centre_basis(mu - m)  # d×d, z = a_inv z' + m: its first K columns are μ_k − m
    a = torch.linalg.inv(a_inv)  # z' = a (z − m): a (μ_k − m) = e_k
    enc, dec = ae.encoder[-1], ae.decoder[0]
    enc.weight.copy_(a @ enc.weight)
    enc.bias.copy_(a @ (enc.bias - m))
    dec.bias.add_(dec.weight @ m)
    dec.weight.copy_(dec.weight @ a_inv)
    # γ_k ∝ exp(−‖z − μ_k‖² / 2σ²) with σ² the per-dimension within-cluster variance, written
    # in the new coordinates (z = a⁻¹ z' + m): logits (2 μ_kᵀ (a⁻¹ z' + m) − ‖μ_k‖²) / 2σ²
    two_var = 2 * (z - mu[labels]).pow(2).sum() / z.numel()
    new_z = (z - m) @ a.T
    w, b = 2 * mu @ a_inv / two_var, (2 * mu @ m - mu.pow(2).sum(1)) / two_var
    if cm.gamma.bias is None:  # no bias to carry the posterior's offsets: fit W alone
        b = torch.zeros_like(b)
    if not torch.equal((new_z @ w.T + b).argmax(1), labels):
        w, b = _logistic_fit(new_z, labels, w, b, fit_bias=cm.gamma.bias is not None)
    cm.gamma.weight.copy_(w)
    cm.mu.weight.copy_(((mu - m) @ a.T).T)  # the centres in the new coordinates: e_k, K ≤ d
    if cm.gamma.bias is not None:
        cm.gamma.bias.copy_(b)
    if cm.mu.bias is not None:
        cm.mu.bias.zero_()
    return new_z


def _logistic_fit(
    z: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, b: torch.Tensor, fit_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression of ``labels`` on ``z`` from the start (w, b): the
    softmax(W z + b) closest to the labels in cross-entropy (L-BFGS; on MNIST's AC-PIC
    clusters it converges in about 20 iterations)."""
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_(fit_bias)
    params = [w, b] if fit_bias else [w]
    opt = torch.optim.LBFGS(params, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _best_origin(mu: torch.Tensor) -> torch.Tensor:
    """The point m of code space from which the centres are seen best conditioned: the m that
    minimises the condition number of ``_centre_basis(mu − m)`` (Nelder–Mead, then Powell,
    from m = 0, so never worse than the origin). From the origin the map that takes the
    centres to the unit vectors can stretch some directions a hundredfold (USPS-11k seed 0:
    condition number 210, the codes' spread around their centres 2,747 in the new
    coordinates, against 11 and 19 from the best m); the clustering module's first epoch then
    moves the codes violently (docs/methods.md). K > d has no such map: m = 0."""
    origin = torch.zeros(mu.shape[1], dtype=mu.dtype, device=mu.device)
    if not _has_centre_basis(mu):
        return origin
    d = mu.shape[1]
    centres = mu.detach().cpu().double().numpy()

    def log_condition(m: np.ndarray) -> float:
        basis = _centre_basis(torch.from_numpy(centres - m)).numpy()
        values = np.linalg.svd(basis, compute_uv=False)
        return float(np.log(values[0] / max(values[-1], 1e-300)))

    start = np.zeros(d)
    best = optimize.minimize(
        log_condition,
        start,
        method="Nelder-Mead",
        options={"maxiter": 400 * d, "xatol": 1e-6, "fatol": 1e-9},
    )
    best = optimize.minimize(log_condition, best.x, method="Powell")
    if not log_condition(best.x) < log_condition(start):
        return origin
    return torch.from_numpy(best.x).to(mu)


def _has_centre_basis(mu: torch.Tensor) -> bool:
    """Whether the K centres (rows of ``mu``, K×d) can be the first K columns of a basis."""
    k, d = mu.shape
    return k <= d and int(torch.linalg.matrix_rank(mu)) == k


def _centre_basis(mu: torch.Tensor) -> torch.Tensor:
    """An invertible d×d matrix whose first K columns are the K rows of ``mu`` (K ≤ d), so its
    inverse takes the centres to the first K unit vectors: the centres are completed to a basis
    by an orthonormal basis of their complement, which is left where it is. With K > d no such
    map exists: the identity scaled by the centres' mean norm (they get unit norm on average)."""
    k, d = mu.shape
    eye = torch.eye(d, dtype=mu.dtype, device=mu.device)
    if not _has_centre_basis(mu):
        return eye * mu.norm(dim=1).mean()
    if k == d:
        return mu.T
    q, _ = torch.linalg.qr(torch.cat([mu.T, eye], 1))
    return torch.cat([mu.T, q[:, k:d]], 1)  # q[:, k:d]: orthonormal, spans what mu does not


@dataclass
class _Snapshot:
    """The state at the end of a kept epoch (before the first: loss ∞, nothing to compare)."""

    loss: float  # the epoch's mean loss
    params: list[torch.Tensor]
    moments: list[dict[str, Any]]  # Adam's state, as ``_moments``
    earlier: _Snapshot | None = None  # the kept epoch before this one
    restored: bool = False  # put back by a rollback after the last epoch


@torch.no_grad()
def _guard(
    last: _Snapshot,
    loss: float,
    factor: float,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    trainer: Trainer,
) -> _Snapshot:
    """After an epoch: undo it if its mean ``loss`` is over ``factor`` times the previous
    epoch's (parameters and Adam's moments back to that epoch's end, learning rate halved, a
    ``rollback`` field in the log), else remember this epoch's state. The labels seen during
    the undone epoch are kept: they only feed the convergence test.

    An epoch's loss is measured on the way, so it also reflects the state the epoch started
    from: when the epoch right after a rollback is over the bar again, the damage came from
    the epoch before, and the state goes back one epoch further (with one step an epoch,
    a folder of up to ``batch_size`` images, undoing the last epoch alone would put back the
    very state that blew up, again and again)."""
    if not loss <= factor * last.loss:  # also catches NaN
        target = last.earlier if last.restored and last.earlier is not None else last
        for p, saved in zip(params, target.params, strict=True):
            p.copy_(saved)
        _restore_moments(opt, target.moments)
        lr = float(opt.param_groups[0]["lr"]) / 2
        set_lr(opt, lr)
        trainer.note(rollback=loss, lr=lr)
        return replace(target, restored=True)
    params_now = [p.detach().clone() for p in params]
    return _Snapshot(loss, params_now, _moments(opt), earlier=replace(last, earlier=None))


def _moments(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """A copy of Adam's state (moments and step count) for each parameter, in order."""
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for group in opt.param_groups
        for p in group["params"]
    ]


def _restore_moments(opt: torch.optim.Optimizer, moments: list[dict[str, Any]]) -> None:
    """Put ``_moments`` back in place: a captured step keeps reading the same tensors. An
    empty state (taken before the first step) puts back a fresh Adam: zero moments, step 0."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for p, saved in zip(params, moments, strict=True):
        if not saved:
            for value in opt.state[p].values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
        for key, value in saved.items():
            if isinstance(value, torch.Tensor):
                opt.state[p][key].copy_(value)
            else:
                opt.state[p][key] = value


@torch.no_grad()
def _running_mean(trainer: Trainer, params: list[nn.Parameter], step: int) -> None:
    """avg ← (avg · s + θ) / (s + 1) over the steps s of the averaging epoch."""
    for i, p in enumerate(params):
        key = f"avg/{i}"
        if step == 0 or key not in trainer.extra:
            trainer.extra[key] = p.detach().clone()
        else:
            trainer.extra[key].mul_(step / (step + 1)).add_(p.detach(), alpha=1 / (step + 1))
