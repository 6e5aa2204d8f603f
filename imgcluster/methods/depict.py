"""DEPICT: deep embedded regularized clustering (Dizaji, Herandi, Deng, Cai, Huang, ICCV 2017).

A convolutional autoencoder maps each image to a K-dimensional tanh embedding z; a softmax
layer on z gives cluster probabilities p. Training alternates, epoch by epoch, between
computing targets q from the clean network's predictions, normalised by cluster frequency so
that no cluster swallows the others, and fitting the noisy (dropout) network's predictions to
those targets by cross-entropy, while a ladder-style reconstruction loss (pixels and every
hidden layer) keeps the embedding faithful to the images. It stops when the targets stop
changing. Read-out: argmax of the clean softmax, i.e. the largest inner product of [z, 1]
with the rows of [W, b].

As the authors' code (herandy/DEPICT): inputs scaled to [-1, 1]; dropout 0.1 on the input
and after the first convolution; Adam lr 1e-4, batch 100; hidden-layer reconstruction weight
0.1; targets q ∝ p²/f (the code; the paper writes p/√f, available as ``target=paper``); the
softmax layer initialised with the L2-normalised centroids of an initial clustering of the
pretrained embeddings (AC-PIC, as the authors ran USPS and MNIST-test; ``init=kmeans`` is
k-means++ with 40 restarts, as they ran MNIST-full), then trained on those labels with early
stopping on their agreement with its predictions on a 10% hold-out (no ground truth involved).
What we shortened and why is in docs/methods.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from .. import rng
from ..engine import (
    DeviceImages,
    GraphedStep,
    Trainer,
    layout,
    make_optimizer,
    map_batches,
    optimizer_step,
    prepare,
)
from ..errors import UsageError
from ..model import ClusterModel, Preprocessing, register_embedder
from ..nets import DepictAE
from . import register
from .acpic import acpic, compile_ahead
from .base import FitContext, Method
from .kmeans import faiss_kmeans

# -- loss terms -------------------------------------------------------------------------------


def reconstruction_loss(
    x: torch.Tensor,
    clean: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    decoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    hidden_weight: float,
) -> torch.Tensor:
    """L_rec = mean‖x̂ − x‖² + λ_h·mean‖ĥ¹ − h¹‖² + λ_h·mean‖ĥ² − h²‖²: the noisy pathway's
    decoder outputs (ĥ², ĥ¹, x̂) regress the clean encoder's activations (h¹, h²) and the input.
    As in the authors' code the clean activations are not detached."""
    h1, h2, _ = clean
    d2, d1, x_hat = decoded
    return (
        (x_hat - x).pow(2).mean()
        + hidden_weight * (d1 - h1).pow(2).mean()
        + hidden_weight * (d2 - h2).pow(2).mean()
    )


def cluster_cross_entropy(q: torch.Tensor, logits_noisy: torch.Tensor) -> torch.Tensor:
    """L_clus = −(1/N) Σ_i Σ_k q_ik log p̃_ik: the noisy pathway's predictions p̃ fitted to the
    targets q (the M-step of DEPICT's relative-entropy objective)."""
    return -(q * F.log_softmax(logits_noisy, dim=1)).sum(1).mean()


def target_distribution(p: torch.Tensor, rule: str = "code") -> torch.Tensor:
    """The E-step targets, with f_k = Σ_i p_ik the soft cluster frequencies:
    ``code`` (what the authors ran): q_ik ∝ p_ik² / f_k;
    ``paper`` (the paper's closed form): q_ik ∝ p_ik / √f_k."""
    f = p.sum(0, keepdim=True).clamp_min(1e-12)
    q = p.pow(2) / f if rule == "code" else p / f.sqrt()
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


# -- modules ----------------------------------------------------------------------------------


@register_embedder
class DepictEmbedder(nn.Module):
    """uint8 images -> [-1, 1] -> DEPICT's clean encoder -> [z, 1] (for the softmax read-out)."""

    def __init__(self, **spec: object) -> None:
        super().__init__()
        self.ae = DepictAE(**spec)  # type: ignore[arg-type]

    def spec(self) -> dict[str, object]:
        return self.ae.spec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.ae(layout(_scale(x)))
        return torch.cat([z, torch.ones_like(z[:, :1])], dim=1)


def _scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1], as the authors' (X − 127.5) / 127.5."""
    return images.float() / 127.5 - 1.0


# -- the method -------------------------------------------------------------------------------


@dataclass
class DepictConfig:
    """Defaults are the authors' code, except the epoch budgets (see docs/methods.md)."""

    pretrain_epochs: int = 60  # autoencoder pretraining (the code: up to 4000, early stopping)
    pretrain_lr: float = 1e-3  # the code: 1e-4 over thousands of epochs
    head_epochs: int = 50  # at most; early stopping, patience 5 (the code: at most 1000)
    epochs: int = 60  # joint training at most; stops earlier when targets converge (code: 4000)
    batch_size: int = 100
    lr: float = 1e-4
    dropout: float = 0.1
    hidden_weight: float = 0.1  # reconstruction weight of each hidden layer
    recon_weight: float = 1.0
    cluster_weight: float = 1.0
    target: Literal["code", "paper"] = "code"
    init: Literal["acpic", "kmeans"] = "acpic"  # initial clustering of the pretrained embeddings
    tol: float = 1e-7  # stop when the mean squared change of the targets is below this
    kmeans_restarts: int = 40
    patience: int = 5
    cuda_graphs: bool = True  # on the GPU, replay each step as one CUDA graph (same arithmetic)

    def validate(self) -> None:
        for name in ("pretrain_epochs", "head_epochs", "epochs", "kmeans_restarts", "patience"):
            if getattr(self, name) < 0:
                raise UsageError(f"parameter {name} must be >= 0")
        if self.batch_size < 1 or self.lr <= 0 or self.pretrain_lr <= 0:
            raise UsageError("parameters batch_size, lr and pretrain_lr must be positive")
        if not 0 <= self.dropout < 1:
            raise UsageError("parameter dropout must be in [0, 1)")
        if self.init not in ("acpic", "kmeans"):
            raise UsageError(f"parameter init must be acpic or kmeans, got {self.init!r}")
        if self.target not in ("code", "paper"):
            raise UsageError(f"parameter target must be code or paper, got {self.target!r}")


@register
class Depict(Method):
    name = "depict"
    summary = "DEPICT (Dizaji et al. 2017): conv autoencoder + frequency-normalised self-training"
    Config = DepictConfig

    def fit(self, images: np.ndarray, ctx: FitContext) -> ClusterModel:
        cfg: DepictConfig = self.config
        n, c, h, _ = images.shape
        self.check_count(n)
        data = DeviceImages(images, ctx.device)
        ae = prepare(DepictAE(c, h, self.k, dropout=cfg.dropout), ctx.device)
        head = prepare(nn.Linear(self.k, self.k), ctx.device)
        trainer = Trainer(ctx, {"ae": ae, "head": head})
        batch = min(cfg.batch_size, n)
        # AC-PIC's numba code compiles in a child process while the autoencoder pretrains
        with compile_ahead(cfg.init == "acpic" and trainer.entering("head")):
            self._pretrain(trainer, data, ae, batch)
            if trainer.entering("head"):
                self._initial_clustering(trainer, data, ae, head)
        self._train_head(trainer, data, ae, head, batch)
        self._train_depict(trainer, data, ae, head, batch)
        embedder = DepictEmbedder(**ae.spec()).to(ctx.device)
        embedder.ae.load_state_dict(ae.state_dict())
        centroids = torch.cat([head.weight.detach(), head.bias.detach()[:, None]], dim=1)
        return ClusterModel(embedder, centroids, "ip", Preprocessing(h, c), self.name, asdict(cfg))

    def _graphs(self, data: DeviceImages) -> bool:
        """CUDA graphs for the steps: on the GPU with the images in its memory, unless off."""
        return self.config.cuda_graphs and data.graphable

    def _pretrain(self, trainer: Trainer, data: DeviceImages, ae: DepictAE, batch: int) -> None:
        """Denoising, layer-wise reconstruction of the autoencoder alone."""
        cfg: DepictConfig = self.config
        graphs = self._graphs(data)
        opt = make_optimizer(
            "adam", ae.parameters(), cfg.pretrain_lr, trainer.device, capturable=graphs
        )

        def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            x = layout(_scale(data.take(idx)))
            clean, noisy = ae.encode_pair(x)
            loss = reconstruction_loss(x, clean, ae.decode(noisy[2]), cfg.hidden_weight)
            optimizer_step(opt, loss)
            return {"loss": loss}

        run = GraphedStep(step, graphs)
        steps = data.n // batch
        for epoch in trainer.phase("pretrain", cfg.pretrain_epochs, {"adam": opt}, steps, batch):
            for idx in trainer.steps(data.epoch(batch, trainer.key(epoch))):
                trainer.record(len(idx), **run(idx))
            _note_graph(trainer, run)

    def _initial_clustering(
        self, trainer: Trainer, data: DeviceImages, ae: DepictAE, head: nn.Linear
    ) -> None:
        """AC-PIC (or k-means) on the clean embeddings; the softmax layer starts at the
        L2-normalised mean embedding of each initial cluster."""
        cfg: DepictConfig = self.config
        codes = _embed(data, ae)
        z = codes.cpu().numpy()
        record: dict[str, object] = {"phase": cfg.init}
        start = time.perf_counter()
        if cfg.init == "acpic":  # its K-NN search runs where the codes are
            labels = acpic(codes, self.k, timings=record)
            centres = np.stack([z[labels == c].mean(0) for c in range(self.k)])
        else:
            km = faiss_kmeans(
                z, self.k, seed=trainer.ctx.seed, epochs=300, restarts=cfg.kmeans_restarts
            )
            labels, centres = km.labels, km.centroids
            record["objective"] = km.objective
        centres_t = torch.from_numpy(np.asarray(centres, dtype=np.float32)).to(trainer.device)
        with torch.no_grad():
            head.weight.copy_(centres_t / centres_t.norm(dim=1, keepdim=True).clamp_min(1e-12))
            head.bias.zero_()
        trainer.extra["initial_labels"] = torch.from_numpy(labels).to(data.index_device)
        record["sizes"] = np.bincount(labels, minlength=self.k).tolist()
        record["seconds"] = round(time.perf_counter() - start, 3)
        trainer.log(record)

    def _train_head(
        self, trainer: Trainer, data: DeviceImages, ae: DepictAE, head: nn.Linear, batch: int
    ) -> None:
        """Fit the softmax layer (and the autoencoder) to the k-means labels; keep the epoch whose
        predictions agree best (NMI) with those labels on a 10% hold-out, patience ``patience``."""
        if "head" not in trainer.done:
            self._fit_head(trainer, data, ae, head, batch)
        _restore(
            trainer, ae, head
        )  # the best epoch's weights (once; kept in the checkpoint till then)

    def _fit_head(
        self, trainer: Trainer, data: DeviceImages, ae: DepictAE, head: nn.Linear, batch: int
    ) -> None:
        cfg: DepictConfig = self.config
        labels = trainer.extra["initial_labels"]
        order = rng.permutation(data.n, rng.key(trainer.ctx.seed, 7), data.index_device)
        held, fit = order[: max(1, data.n // 10)], order[max(1, data.n // 10) :]
        params = [*ae.parameters(), *head.parameters()]
        graphs = self._graphs(data)
        opt = make_optimizer("adam", params, cfg.lr, trainer.device, capturable=graphs)
        if "best_nmi" not in trainer.extra:
            trainer.extra["best_nmi"] = torch.tensor(_agreement(data, ae, head, held, labels))
            _snapshot(trainer, ae, head)

        def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            x = layout(_scale(data.take(idx)))
            clean, (_, _, z) = ae.encode_pair(x)
            rec = reconstruction_loss(x, clean, ae.decode(z), cfg.hidden_weight)
            ce = F.cross_entropy(head(z), labels[idx].to(z.device))
            loss = cfg.recon_weight * rec + cfg.cluster_weight * ce
            optimizer_step(opt, loss)
            return {"loss": loss, "rec": rec, "ce": ce}

        run = GraphedStep(step, graphs)
        steps = len(fit) // batch
        for epoch in trainer.phase("head", cfg.head_epochs, {"adam": opt}, steps, batch):
            for idx in trainer.steps(data.epoch(batch, trainer.key(epoch), subset=fit)):
                trainer.record(len(idx), **run(idx))
            _note_graph(trainer, run)
            nmi = _agreement(data, ae, head, held, labels)
            trainer.note(holdout_nmi=round(nmi, 5))
            if nmi > float(trainer.extra["best_nmi"]):
                trainer.extra["best_nmi"] = torch.tensor(nmi)
                trainer.extra["since_best"] = torch.tensor(0)
                _snapshot(trainer, ae, head)
            else:
                trainer.extra["since_best"] = trainer.extra.get("since_best", torch.tensor(0)) + 1
                if int(trainer.extra["since_best"]) > cfg.patience:
                    trainer.finish_phase()

    def _train_depict(
        self, trainer: Trainer, data: DeviceImages, ae: DepictAE, head: nn.Linear, batch: int
    ) -> None:
        """Joint training: targets from the clean predictions of the previous epoch (``q`` and
        ``p`` are updated in place, so a captured step keeps reading the current ones)."""
        cfg: DepictConfig = self.config
        if trainer.entering("depict"):
            trainer.extra["q"] = target_distribution(_predict(data, ae, head), cfg.target)
            trainer.extra["p"] = trainer.extra["q"].clone()
        q, p = trainer.extra["q"], trainer.extra["p"]
        params = [*ae.parameters(), *head.parameters()]
        graphs = self._graphs(data)
        opt = make_optimizer("adam", params, cfg.lr, trainer.device, capturable=graphs)

        def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            x = layout(_scale(data.take(idx)))
            rows = idx.to(q.device)
            clean, (_, _, z) = ae.encode_pair(x)
            rec = reconstruction_loss(x, clean, ae.decode(z), cfg.hidden_weight)
            ce = cluster_cross_entropy(q[rows], head(z))
            loss = cfg.recon_weight * rec + cfg.cluster_weight * ce
            optimizer_step(opt, loss)
            with torch.no_grad():  # this batch's clean prediction, for next epoch's targets
                p[rows] = torch.softmax(head(ae.encode(x, noisy=False)[2]), dim=1)
            return {"loss": loss, "rec": rec, "ce": ce}

        run = GraphedStep(step, graphs)
        steps = -(-data.n // batch)
        for epoch in trainer.phase("depict", cfg.epochs, {"adam": opt}, steps, batch):
            for idx in trainer.steps(data.epoch(batch, trainer.key(epoch), drop_last=False)):
                trainer.record(len(idx), **run(idx))
            _note_graph(trainer, run)
            new_q = target_distribution(p, cfg.target)
            change = float((new_q - q).pow(2).mean())
            q.copy_(new_q)
            labels = new_q.argmax(1)
            trainer.note(
                target_change=change, sizes=torch.bincount(labels, minlength=self.k).tolist()
            )
            if change < cfg.tol:
                trainer.finish_phase()


def _note_graph(trainer: Trainer, run: GraphedStep) -> None:
    """Say in the epoch's log line whether the steps were replayed as a CUDA graph."""
    if run.enabled:
        trainer.note(cuda_graph=run.status())


def _embed(data: DeviceImages, ae: DepictAE) -> torch.Tensor:
    with torch.no_grad():
        return map_batches(data, 1000, lambda b: ae(layout(_scale(b))))


def _predict(
    data: DeviceImages, ae: DepictAE, head: nn.Linear, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Clean softmax predictions of every image (or of ``rows``)."""
    with torch.no_grad():
        if rows is None:
            return map_batches(data, 1000, lambda b: torch.softmax(head(ae(layout(_scale(b)))), 1))
        out = [torch.softmax(head(ae(layout(_scale(data.take(r))))), 1) for r in rows.split(1000)]
        return torch.cat(out)


def _agreement(
    data: DeviceImages, ae: DepictAE, head: nn.Linear, rows: torch.Tensor, labels: torch.Tensor
) -> float:
    """NMI between the k-means labels and the network's predictions on the hold-out rows."""
    predicted = _predict(data, ae, head, rows).argmax(1).cpu().numpy()
    return float(normalized_mutual_info_score(labels[rows].cpu().numpy(), predicted))


def _snapshot(trainer: Trainer, ae: DepictAE, head: nn.Linear) -> None:
    for name, module in (("ae", ae), ("head", head)):
        for key, value in module.state_dict().items():
            trainer.extra[f"best/{name}/{key}"] = value.detach().clone()


def _restore(trainer: Trainer, ae: DepictAE, head: nn.Linear) -> None:
    for name, module in (("ae", ae), ("head", head)):
        prefix = f"best/{name}/"
        state = {k[len(prefix) :]: v for k, v in trainer.extra.items() if k.startswith(prefix)}
        if state:
            module.load_state_dict(state)
    for key in [k for k in trainer.extra if k.startswith("best/")]:
        del trainer.extra[key]
