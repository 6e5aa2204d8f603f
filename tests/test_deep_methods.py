"""DEPICT, AE-CM, ADC and MMDC on tiny data: they train (the loss falls), write a run folder
that reloads, and `assign` reproduces their labels. Accuracy is measured by
benchmarks/run.py, not here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from imgcluster import assign, engine, evaluate, train
from imgcluster.augment import AugmentConfig
from imgcluster.errors import Interrupted, UsageError
from imgcluster.methods import adc, mmdc
from imgcluster.methods import aecm as cm
from imgcluster.methods import depict as dp
from imgcluster.model import ClusterModel

from conftest import make_toy_folder

SHORT = {
    "adc": {
        "steps": "40",
        "reg_warmup_steps": "20",
        "round_steps": "10",
        "warmup_steps": "10",
        "batch_size": "16",
    },
    "depict": {"pretrain_epochs": "6", "head_epochs": "4", "epochs": "6", "batch_size": "16"},
    "aecm": {"init": "rand", "epochs": "25", "batch_size": "16", "tol": "0"},
    "mmdc": {"epochs": "60", "batch_size": "16", "refine_epoch": "-1"},
    "aecm-pre": {
        "init": "pre",
        "pretrain_epochs": "5",
        "cm_epochs": "5",
        "epochs": "5",
        "batch_size": "16",
    },
}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train.log.jsonl").read_text().splitlines()]


def _labels(path: Path, strip: Path | None = None) -> dict[str, str]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {
        str(Path(r["path"]).relative_to(strip)) if strip else r["path"]: r["cluster"] for r in rows
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_folder(tmp_path_factory.mktemp("deep") / "toy", per_class=16)


@pytest.mark.parametrize("name", sorted(SHORT))
def test_short_run_trains_reloads_and_assigns_the_same(
    name: str, folder: Path, tmp_path: Path
) -> None:
    method = name.split("-")[0]
    run = train([folder], 3, method=method, params=SHORT[name], out=tmp_path / "run").run_dir
    log = _log(run)
    learning = {"depict": "pretrain", "aecm": "joint", "adc": "cluster", "mmdc": "cluster"}[method]
    losses = [r["loss"] for r in log if r.get("phase") == learning]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # it learns
    main_phase = {"depict": "depict", "aecm": "joint", "adc": "cluster", "mmdc": "cluster"}[method]
    main = [r for r in log if r.get("phase") == main_phase]
    assert main and "sizes" in main[-1]
    model = ClusterModel.load(run)
    assert model.method == method and model.metric == "ip" and model.k == 3
    out = tmp_path / "assigned.csv"
    assign(run, [folder], out=out)
    assert _labels(out, folder) == _labels(run / "labels.csv")
    assert evaluate(run / "labels.csv").acc > 1 / 3  # better than chance on easy data


def test_adc_trains_in_bf16_on_the_cpu_when_asked(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = adc.autocast

    def spy(device: torch.device) -> object:
        ctx = real(device)
        seen.append(isinstance(ctx, torch.autocast))
        return ctx

    monkeypatch.setattr(adc, "autocast", spy)
    run = train(
        [folder], 3, method="adc", params=SHORT["adc"], out=tmp_path / "run", precision="bf16"
    ).run_dir
    assert seen and all(seen)  # every training step ran under bf16 autocast
    recorded = json.loads((run / "model.json").read_text())["config"]
    # the values the run used: the grey recipe's, and the steps given
    assert (recorded["recipe"], recorded["visit_weight"], recorded["steps"]) == ("mnist", 1.0, 40)
    assert (recorded["network"], recorded["emb_size"], recorded["augment"]) == (
        "convnet",
        128,
        "torchvision",
    )
    losses = [r["loss"] for r in _log(run) if r.get("phase") == "cluster"]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    out = tmp_path / "assigned.csv"
    assign(run, [folder], out=out)  # labelling is fp32 in both, so the labels agree
    assert _labels(out, folder) == _labels(run / "labels.csv")


def test_depict_targets() -> None:
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    for rule in ("code", "paper"):
        q = dp.target_distribution(p, rule)
        assert torch.allclose(q.sum(1), torch.ones(3))
        assert (q.argmax(1) == p.argmax(1)).all()
    code = dp.target_distribution(p, "code")
    f = p.sum(0)
    expected = p**2 / f
    assert torch.allclose(code, expected / expected.sum(1, keepdim=True))
    assert code[0, 0] > p[0, 0]  # q sharpens confident predictions
    logits = torch.log(p)
    assert torch.isclose(dp.cluster_cross_entropy(p, logits), -(p * torch.log(p)).sum(1).mean())


def test_aecm_loss_terms() -> None:
    gamma = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert torch.isclose(cm.cm_sparsity(gamma, d=1), torch.tensor(0.25))
    for norm in ("l1", "l2"):
        assert cm.orthonormality(torch.eye(3), norm) == 0
    # off by 1 on both diagonal entries and 2 on both off-diagonal ones
    assert cm.orthonormality(torch.ones(2, 2), "l1") == 6
    assert cm.orthonormality(torch.ones(2, 2), "l2") == 10
    balanced = torch.full((4, 2), 0.5)
    skewed = torch.tensor([[0.99, 0.01]] * 4)
    assert cm.dirichlet_prior(skewed, alpha=2.0) > cm.dirichlet_prior(balanced, alpha=2.0)
    z = torch.randn(5, 3)
    assert cm.cm_reconstruction(z, z) == 0
    # the plain CM's terms add up to the expected k-means distortion E1 + E2 + E3 = Σ γ ‖z − u‖²
    u = torch.randn(2, 3)
    g = torch.softmax(torch.randn(5, 2), 1)
    total = cm.cm_reconstruction(z, g @ u) + cm.cm_sparsity_weighted(g, u) + cm.cm_merging(g, u)
    distortion = (g * torch.cdist(z, u).pow(2)).sum() / z.numel()
    assert torch.isclose(total, distortion, atol=1e-5)


def test_aecm_read_out_is_argmax_gamma() -> None:
    torch.manual_seed(0)
    module = cm.ClusteringModule(d=4, k=3, bias=True)
    with torch.no_grad():
        module.gamma.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))  # biases that change argmax
    z = torch.randn(50, 4)
    gamma, _ = module(z)
    scores = torch.cat([z, torch.ones(50, 1)], dim=1) @ module.read_out().T
    assert torch.equal(scores.argmax(1), gamma.argmax(1))
    assert not torch.equal((z @ module.gamma.weight.T).argmax(1), gamma.argmax(1))
    # u_k = μ(e_k): the decoder applied to the one-hot vectors, bias included
    assert torch.allclose(module.centroids, module.mu(torch.eye(3)))


@pytest.mark.parametrize(("k", "d"), [(3, 3), (3, 5), (4, 2)])
def test_aecm_hand_over_keeps_the_autoencoder_and_the_k_means_labels(k: int, d: int) -> None:
    torch.manual_seed(0)
    ae = cm.MLPAutoencoder(12, d, hidden=(16,))
    module = cm.ClusteringModule(d, k, bias=True)
    x = torch.rand(60, 12)
    with torch.no_grad():
        z = ae(x)
        before = ae.reconstruct(z)
        labels, centres = cm._initial_clustering(z, k, "kmeans", seed=0)
        new_z = cm._hand_over(ae, module, z, labels, centres)
        assert torch.allclose(ae(x), new_z, atol=1e-4)  # the encoder now gives the new codes
        assert torch.allclose(ae.reconstruct(new_z), before, atol=1e-4)  # same autoencoder
        km = cm.faiss_kmeans(z.numpy(), k, seed=0, epochs=100, restarts=20)
        gamma, _ = module(new_z)
    assert torch.equal(labels, torch.from_numpy(km.labels).long())
    assert torch.equal(gamma.argmax(1), labels)  # γ starts at the k-means labels
    if k <= d:  # the centres are the unit vectors: the orthonormality penalty starts at 0
        assert cm.orthonormality(module.centroids).item() < 1e-6
        centres = torch.stack([new_z[labels == j].mean(0) for j in range(k)])
        assert torch.allclose(centres, torch.eye(k, d), atol=1e-3)


def test_aecm_hand_over_takes_its_origin_where_the_map_is_well_conditioned() -> None:
    # centres far from the origin and close together: seen from there, nearly parallel
    mu = 10.0 + torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def condition(m: torch.Tensor) -> float:
        values = torch.linalg.svdvals(cm._centre_basis(mu - m))
        return (values[0] / values[-1]).item()

    m = cm._best_origin(mu)
    assert condition(torch.zeros(4, dtype=torch.float64)) > 50
    assert condition(m) < 5
    assert torch.equal(cm._best_origin(mu[:2, :1]), torch.zeros(1, dtype=torch.float64))  # K > d


def test_aecm_hand_over_fits_gamma_to_clusters_that_are_not_voronoi_cells() -> None:
    torch.manual_seed(0)
    ae = cm.MLPAutoencoder(12, 2, hidden=(16,))
    module = cm.ClusteringModule(2, 2, bias=True)
    with torch.no_grad():
        z = ae(torch.rand(200, 12))
    # a split by a line that is not the perpendicular bisector of the two groups' means
    labels = (z @ torch.tensor([1.0, 3.0]) > (z @ torch.tensor([1.0, 3.0])).median()).long()
    centres = torch.stack([z[labels == j].mean(0) for j in range(2)])
    nearest = torch.cdist(z, centres).argmin(1)
    assert not torch.equal(nearest, labels)  # the centres' Voronoi cells miss some points
    new_z = cm._hand_over(ae, module, z, labels, centres)
    with torch.no_grad():
        gamma, _ = module(new_z)
    assert torch.equal(gamma.argmax(1), labels)  # the logistic fit reproduces the split
    assert cm.orthonormality(module.centroids).item() < 1e-6


def test_aecm_acpic_start_is_logged(folder: Path, tmp_path: Path) -> None:
    params = {"pretrain_epochs": "3", "epochs": "2", "batch_size": "16"}  # init=pre, AC-PIC
    run = train([folder], 3, method="aecm", params=params, out=tmp_path / "run").run_dir
    (hand_over,) = [r for r in _log(run) if r.get("phase") == "hand-over"]
    assert hand_over["clustering"] == "acpic" and 0.5 < hand_over["agreement"] <= 1
    assert 0 < hand_over["clustering_seconds"] <= hand_over["seconds"]
    assert 0 < hand_over["graph_seconds"] + hand_over["merge_seconds"] <= hand_over["seconds"]
    pretrained = [r for r in _log(run) if r.get("phase") == "pretrain"][-1]
    assert pretrained["elapsed"] + hand_over["seconds"] <= hand_over["elapsed"]  # in between


def test_aecm_stops_when_few_images_change_cluster(folder: Path, tmp_path: Path) -> None:
    params = {"init": "rand", "epochs": "40", "batch_size": "16", "tol": "0.05"}
    run = train([folder], 3, method="aecm", params=params, out=tmp_path / "run").run_dir
    change = [r["label_change"] for r in _log(run) if r.get("phase") == "joint"]
    assert change[0] == 1  # no labels before the first epoch
    # it ran until the first epoch under tol and no further (48 images: fewer than 3 moved)
    assert len(change) < 40 and change[-1] < 0.05 and min(change[:-1]) >= 0.05


def _adam_epoch(opt: torch.optim.Optimizer, w: torch.nn.Parameter) -> None:
    """One step of Adam: the stand-in for an epoch of training."""
    w.grad = torch.ones_like(w)
    opt.step()


def _start(w: torch.nn.Parameter, opt: torch.optim.Optimizer) -> cm._Snapshot:
    """The snapshot ``_joint`` takes before a phase's first epoch."""
    return cm._Snapshot(float("inf"), [w.detach().clone()], cm._moments(opt))


def test_aecm_undoes_an_epoch_whose_loss_blows_up() -> None:
    notes: dict = {}
    trainer = SimpleNamespace(note=notes.update)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=1e-3)
    start = _start(w, opt)
    _adam_epoch(opt, w)
    good = cm._guard(start, 1.0, 10.0, [w], opt, trainer)  # the first epoch is kept
    kept, moment = w.detach().clone(), opt.state[w]["exp_avg"]
    _adam_epoch(opt, w)  # the "bad" epoch
    rolled = cm._guard(good, 50.0, 10.0, [w], opt, trainer)
    assert torch.equal(w.detach(), kept) and opt.param_groups[0]["lr"] == 5e-4
    assert notes == {"rollback": 50.0, "lr": 5e-4}
    assert int(opt.state_dict()["state"][0]["step"]) == 1  # Adam's moments rolled back too
    # in place, so that a step replayed as a CUDA graph keeps reading them
    assert opt.state[w]["exp_avg"] is moment
    _adam_epoch(opt, w)
    later = cm._guard(rolled, 5.0, 10.0, [w], opt, trainer)  # within the factor: kept
    assert later.loss == 5.0 and notes["lr"] == 5e-4 and not later.restored


def test_aecm_goes_one_epoch_further_back_when_the_rollback_did_not_help() -> None:
    """With one step an epoch an epoch's loss is that of the state it starts from: undoing
    it puts back the state that blew up, so the next epoch is over the bar again and the
    guard goes back one more epoch; at the start of the phase, to a fresh Adam."""
    notes: dict = {}
    trainer = SimpleNamespace(note=notes.update)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=1e-3)
    initial = w.detach().clone()
    start = _start(w, opt)
    _adam_epoch(opt, w)
    first = cm._guard(start, 2.0, 10.0, [w], opt, trainer)
    after_first = w.detach().clone()
    _adam_epoch(opt, w)
    rolled = cm._guard(first, 60.0, 10.0, [w], opt, trainer)  # back to the end of epoch 1
    assert torch.equal(w.detach(), after_first) and rolled.restored
    again = cm._guard(rolled, 60.0, 10.0, [w], opt, trainer)  # still 60: back to the start
    assert torch.equal(w.detach(), initial) and opt.param_groups[0]["lr"] == 2.5e-4
    assert int(opt.state[w]["step"]) == 0 and not opt.state[w]["exp_avg"].any()
    assert again.loss == float("inf")  # nothing to compare the next epoch with
    _adam_epoch(opt, w)
    assert not cm._guard(again, 2.0, 10.0, [w], opt, trainer).restored


def test_aecm_rollback_keeps_a_held_learning_rate_in_its_tensor() -> None:
    """Under CUDA graphs the learning rate lives in a tensor the graph reads (``hold_lr``):
    the rollback halves it there and logs a number."""
    notes: dict = {}
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=torch.tensor(1e-3))
    held = opt.param_groups[0]["lr"]
    _adam_epoch(opt, w)
    first = cm._guard(_start(w, opt), 1.0, 10.0, [w], opt, SimpleNamespace(note=notes.update))
    cm._guard(first, 50.0, 10.0, [w], opt, SimpleNamespace(note=notes.update))
    assert opt.param_groups[0]["lr"] is held and float(held) == pytest.approx(5e-4)
    assert isinstance(notes["lr"], float)


def test_adc_association_losses() -> None:
    e = 10 * torch.eye(2)
    centroids = torch.stack([e[0], e[0], e[1], e[1]])  # two per cluster
    labels = torch.tensor([0, 0, 1, 1])
    # a round trip from a centroid lands on one of its cluster's two: the loss is log 2
    assert torch.isclose(
        adc.walker_loss(centroids, e, labels), torch.log(torch.tensor(2.0)), atol=1e-3
    )
    assert adc.walker_loss(centroids, e, torch.tensor([0, 1, 0, 1])) > 1.0  # wrong grouping
    # both images visited evenly: log |B|; only one visited: far more
    assert torch.isclose(adc.visit_loss(centroids, e), torch.log(torch.tensor(2.0)), atol=1e-3)
    assert adc.visit_loss(torch.stack([e[0]] * 4), e) > 5.0
    assert adc.norm_loss(torch.tensor([[3.0, 4.0]]), 5.0) == 0
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    assert adc.logit_loss(logits, torch.tensor([0, 1])) < adc.logit_loss(
        logits, torch.tensor([1, 0])
    )


def test_adc_restart_adam_keeps_the_moments_of_what_the_code_did_not_reset() -> None:
    kept, fresh = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([kept, fresh], lr=0.1, betas=(0.8, 0.9))
    for _ in range(20):  # the warm-up: both get moments
        opt.zero_grad()
        (kept.sum() + fresh.sum()).backward()
        opt.step()
    moment = opt.state[kept]["exp_avg"].clone()
    adc.restart_adam(opt, [fresh])
    assert all(float(opt.state[p]["step"]) == 0 for p in (kept, fresh))  # bias correction anew
    assert torch.equal(opt.state[kept]["exp_avg"], moment)
    assert not opt.state[fresh]["exp_avg"].any() and not opt.state[fresh]["exp_avg_sq"].any()
    before = kept.detach().clone(), fresh.detach().clone()
    opt.zero_grad()
    (0.01 * (kept.sum() + fresh.sum())).backward()  # a much smaller gradient than the warm-up's
    opt.step()
    # reset moments: a step of the full learning rate whatever the gradient's size
    assert torch.allclose(before[1] - fresh.detach(), torch.full((2,), 0.1))
    # kept ones go on from the warm-up's (gradient 1 for 20 steps), bias-corrected as at step 1
    m = 0.8 * (1 - 0.8**20) + 0.2 * 0.01
    v = 0.9 * (1 - 0.9**20) + 0.1 * 0.01**2
    step = 0.1 * (m / 0.2) / (v / 0.1) ** 0.5
    assert step > 0.14 and torch.allclose(before[0] - kept.detach(), torch.full((2,), step))


def test_adc_momentum_step_moves_the_network_weights_once_more() -> None:
    weight, centroid = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([weight, centroid], lr=0.01, betas=(0.8, 0.9))
    for _ in range(200):  # a steady gradient of 1 on both
        engine.optimizer_step(opt, (weight + centroid).sum())
        adc.momentum_step(opt, [weight], [centroid])
    # the centroid took plain Adam steps (lr each); the weight, with the zero-gradient step,
    # about 1.41 lr a step: m/√v with the moments decayed twice a step
    assert float(-centroid.detach()) == pytest.approx(200 * 0.01, rel=1e-3)
    m, v = 0.16 / 0.36, 0.09 / 0.19  # the stationary moments, after the second step
    steady = (0.8 * m + 0.2) / (0.9 * v + 0.1) ** 0.5 * (1 + 0.8 / 0.9**0.5)
    assert steady == pytest.approx(1.41, abs=0.01)
    assert float(-weight.detach()) == pytest.approx(200 * 0.01 * steady, rel=0.02)
    assert float(opt.state[weight]["step"]) == 400 and float(opt.state[centroid]["step"]) == 200


def test_adc_learning_rate_ramps_and_decays() -> None:
    cfg = adc.ADCConfig().resolve(channels=1)
    lr = [adc.learning_rate(s, cfg) for s in (0, cfg.warmup_steps // 2, cfg.warmup_steps)]
    assert lr[0] < 0.01 * cfg.lr and abs(lr[1] - cfg.lr / 2) < 2e-6 and lr[2] > 0.99 * cfg.lr
    decayed = adc.learning_rate(cfg.decay_steps + 1, cfg)
    assert abs(decayed - cfg.decay_factor * cfg.lr) < 1e-5


def test_adc_rejects_bad_settings() -> None:
    with pytest.raises(UsageError, match="reg_warmup_steps"):
        adc.ADC(3, adc.ADCConfig(steps=100, reg_warmup_steps=100))
    with pytest.raises(UsageError, match="network"):
        adc.ADC(3, adc.ADCConfig(network="vgg"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="augment"):
        adc.ADC(3, adc.ADCConfig(augment="kornia"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="visit_weight"):
        adc.ADC(3, adc.ADCConfig(visit_weight=-1.0))
    with pytest.raises(UsageError, match="steps"):
        adc.ADC(3, adc.ADCConfig(steps=0))
    with pytest.raises(UsageError, match="order"):
        adc.ADC(3, adc.ADCConfig(order="shuffled"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="reg_warmup_steps"):  # longer than the recipe's run
        adc.ADC(3, adc.ADCConfig(recipe="mnist", reg_warmup_steps=20000))
    # with the recipe left to the family, that is found when the family is known
    with pytest.raises(UsageError, match="reg_warmup_steps"):
        adc.ADCConfig(reg_warmup_steps=20000).resolve(channels=1)
    assert adc.ADCConfig(reg_warmup_steps=20000).resolve(channels=3).steps == 35000


def test_adc_reads_its_images_in_the_order_asked() -> None:
    """epochs: every image once an epoch, whatever the rounds' boundaries (a round may span
    two epochs); fixed: the same order every epoch; rounds: each round its own draws."""
    data = engine.DeviceImages(
        torch.zeros(50, 1, 2, 2, dtype=torch.uint8).numpy(), torch.device("cpu")
    )

    def stream(order: str, rounds: int, round_steps: int = 3) -> torch.Tensor:
        cfg = adc.ADCConfig(order=order, round_steps=round_steps)  # type: ignore[arg-type]
        parts = [adc._batches(data, 10, cfg, r * round_steps, r, 7) for r in range(rounds)]
        return torch.cat([b for part in parts for b in part])

    epochs = stream("epochs", 5)  # 15 steps of 10: three epochs of 50
    assert all(len(set(epochs[e * 50 : (e + 1) * 50].tolist())) == 50 for e in range(3))
    assert not torch.equal(epochs[:50], epochs[50:100])
    assert torch.equal(stream("epochs", 3, round_steps=5), epochs)  # rounds cut it anywhere
    fixed = stream("fixed", 5)
    assert torch.equal(fixed[:50], fixed[50:100]) and len(set(fixed[:50].tolist())) == 50
    rounds = stream("rounds", 5)
    assert len(set(rounds[:30].tolist())) == 30 and not torch.equal(rounds[:50], epochs[:50])


@pytest.mark.parametrize("geometry", ["affine", "cv2"])
def test_adc_on_colour_images_trains_with_the_tf_augmentation(
    geometry: str, tmp_path: Path
) -> None:
    colour = make_toy_folder(tmp_path / "colour", per_class=8, colour=True)
    params = {**SHORT["adc"], "geometry": geometry}
    run = train([colour], 3, method="adc", params=params, out=tmp_path / "run").run_dir
    recorded = json.loads((run / "model.json").read_text())["config"]
    assert (recorded["recipe"], recorded["network"], recorded["augment"], recorded["order"]) == (
        "cifar",
        "resnet20",
        "tf",
        "fixed",  # the authors' pipeline's order, which their CIFAR command read in
    )
    assert recorded["geometry"] == geometry
    losses = [r["loss"] for r in _log(run) if r.get("phase") == "cluster"]
    assert len(losses) >= 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_adc_recipe_follows_the_image_family_unless_set() -> None:
    grey, colour = adc.ADCConfig().resolve(channels=1), adc.ADCConfig().resolve(channels=3)
    # the authors' MNIST command (99 %) and CIFAR-10 command (33 %)
    assert grey.recipe == "mnist" and (grey.steps, grey.reg_warmup_steps) == (12000, 1000)
    assert (grey.decay_steps, grey.visit_weight, grey.norm_target) == (5000, 1.0, 1.0)
    assert colour.recipe == "cifar" and (colour.steps, colour.reg_warmup_steps) == (35000, 3000)
    assert (colour.decay_steps, colour.visit_weight, colour.norm_target) == (10000, 0.5, 3.0)
    assert (grey.order, colour.order) == ("rounds", "fixed")
    assert adc.ADCConfig(order="epochs").resolve(channels=3).order == "epochs"
    # the network and embedding size follow the family too (the authors' commands)
    assert (grey.network, grey.emb_size, colour.network, colour.emb_size) == (
        "convnet",
        128,
        "resnet20",
        64,
    )
    assert adc.ADCConfig(network="convnet").resolve(channels=3).emb_size == 128
    # weight decay follows the network: slim's 1e-3 on the conv net, none on TF's ResNet
    assert (grey.weight_decay, colour.weight_decay) == (1e-3, 0.0)
    assert adc.ADCConfig(weight_decay=1e-4).resolve(channels=3).weight_decay == 1e-4
    # colour augmentation reads the authors' numbers as their TensorFlow code did
    assert (grey.augment, colour.augment) == ("torchvision", "tf")
    assert adc.ADCConfig(augment="torchvision").resolve(channels=3).augment == "torchvision"
    tf_colour = adc.augmentation(3, "tf")
    assert tf_colour.tf_jitter is not None and tf_colour.tf_jitter.contrast == (0.4, 1.8)
    assert tf_colour.padding == "grey" and tf_colour.flip and tf_colour.brightness == 0
    assert adc.augmentation(1, "torchvision").brightness == 0.5
    # the geometry stays the one measured unless asked for: cv2 is the authors' chain
    assert tf_colour.geometry == "affine" and colour.geometry == "affine"
    cv2 = adc.augmentation(3, "tf", adc.ADC.make_config({"geometry": "cv2"}).geometry)
    assert cv2.geometry == "cv2" and cv2.crop == "square" and cv2.crop_scale == (0.8, 1.0)
    with pytest.raises(UsageError, match="geometry"):
        adc.ADC.make_config({"geometry": "opencv"}).validate()
    # a recipe by name, and a value given by the user, win over the family
    assert adc.ADCConfig(recipe="mnist").resolve(channels=3).steps == 12000
    assert adc.ADCConfig(steps=5000).resolve(channels=3).steps == 5000
    assert adc.ADCConfig(visit_weight=0.3).resolve(channels=1).visit_weight == 0.3
    # parameters arrive as strings from the command line; "none" leaves them to the recipe
    cfg = adc.ADC.make_config({"steps": "none", "warmup_steps": "10", "recipe": "cifar"})
    assert cfg.resolve(channels=1).steps == 35000 and cfg.warmup_steps == 10


def test_aecm_reconstruction_weight_follows_init_unless_set() -> None:
    assert cm.AECMConfig(init="rand").reconstruction_weight == 392.0  # the authors' MNIST run
    assert cm.AECMConfig(init="pre").reconstruction_weight == 3.92
    assert cm.AECMConfig(init="rand", beta=5.0).reconstruction_weight == 5.0


def test_aecm_rejects_bad_settings() -> None:
    with pytest.raises(UsageError, match="orth"):
        cm.AECM(3, cm.AECMConfig(orth="l3"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="eps"):
        cm.AECM(3, cm.AECMConfig(eps=0))
    with pytest.raises(UsageError, match="rollback"):
        cm.AECM(3, cm.AECMConfig(rollback=0.5))
    with pytest.raises(UsageError, match="tol"):
        cm.AECM(3, cm.AECMConfig(tol=1.5))


def test_mmdc_rotation_and_refinement_on_colour_images(tmp_path: Path) -> None:
    folder = make_toy_folder(tmp_path / "toy", per_class=8, colour=True)
    params = {"epochs": "3", "batch_size": "8", "refine_epoch": "2"}
    run = train([folder], 3, method="mmdc", params=params, out=tmp_path / "run").run_dir
    log = [r for r in _log(run) if r.get("phase") == "cluster"]
    assert len(log) == 3 and all("rot" in r for r in log)  # the rotation task ran every epoch
    assert sum(log[-1]["sizes"]) == 24  # the refined targets cover every image
    assert json.loads((run / "model.json").read_text())["embedder"]["args"]["rotation"]
    out = tmp_path / "assigned.csv"
    assign(run, [folder], out=out)
    assert _labels(out, folder) == _labels(run / "labels.csv")


def test_mmdc_runs_the_rotation_task_before_every_nth_epoch(tmp_path: Path) -> None:
    folder = make_toy_folder(tmp_path / "toy", per_class=4, colour=True)
    params = {"epochs": "5", "batch_size": "12", "refine_epoch": "-1", "rotation_every": "2"}
    run = train([folder], 3, method="mmdc", params=params, out=tmp_path / "run").run_dir
    log = [r for r in _log(run) if r.get("phase") == "cluster"]
    assert ["rot" in r for r in log] == [True, False, True, False, True]
    # the rotation pass's seconds are logged where it ran: a part of the epoch's
    assert all(("rotation_s" in r) == ("rot" in r) for r in log)
    assert all(0 < r["rotation_s"] <= r["seconds"] for r in log if "rot" in r)
    assert all(r["images"] == 12 * (5 if "rot" in r else 1) for r in log)
    with pytest.raises(UsageError, match="rotation_every"):
        mmdc.MMDC(3, mmdc.MMDCConfig(rotation_every=0))


def test_mmdc_resumed_after_an_epochs_first_passes_does_not_run_them_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop (Ctrl-C, or SIGINT from a time limit) asked for during the passes before an
    epoch's clustering steps (here the refinement's k-means, then the rotation pass) lands at
    the first clustering step; resumed from there, the run goes on as one never stopped,
    without a second k-means (on weights the rotation pass has moved) or rotation pass."""
    folder = make_toy_folder(tmp_path / "toy", per_class=4, colour=True)
    params = {"epochs": "3", "batch_size": "12", "refine_epoch": "1"}
    straight = train([folder], 3, method="mmdc", params=params, out=tmp_path / "a", seed=1)
    note = engine.Trainer.note

    def stop_during_the_second_rotation_pass(self: engine.Trainer, **values: object) -> None:
        note(self, **values)
        if "rotation_s" in values and self.epoch == 1:
            self._stop.set()

    refine, refinements = mmdc.MMDC._refine_targets, []

    def counted(self: mmdc.MMDC, trainer: engine.Trainer, *args: object) -> None:
        refinements.append(trainer.epoch)
        refine(self, trainer, *args)

    monkeypatch.setattr(mmdc.MMDC, "_refine_targets", counted)
    monkeypatch.setattr(engine.Trainer, "note", stop_during_the_second_rotation_pass)
    with pytest.raises(Interrupted):
        train([folder], 3, method="mmdc", params=params, out=tmp_path / "b", seed=1)
    monkeypatch.setattr(engine.Trainer, "note", note)
    resumed = train(resume=tmp_path / "b").run_dir
    # (on this easy data a second k-means would find the same clusters: counted, not compared)
    assert refinements == [1, 2]
    a, b = (load_file(str(run / "model.safetensors")) for run in (straight.run_dir, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "labels.csv").read_text() == (straight.run_dir / "labels.csv").read_text()


def test_mmdc_crops_each_turned_copy_on_its_own() -> None:
    x = torch.rand(3, 3, 16, 16)
    crop = mmdc.family(3, 16).augment
    crop = AugmentConfig(crop=crop.crop, crop_sides=crop.crop_sides)
    views, labels = mmdc.rotation_views(x, crop, 7)
    assert views.shape == (12, 3, 16, 16)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # turned back, the four copies of an image are four different crops of it
    back = torch.stack([torch.rot90(views[3 * r : 3 * r + 3], -r, dims=(2, 3)) for r in range(4)])
    assert all(not torch.allclose(back[0], back[r]) for r in range(1, 4))


def test_mmdc_targets_and_reassignment() -> None:
    gen = torch.Generator().manual_seed(0)
    t = mmdc.mixture_targets(3000, 3, 0.0, gen)
    assert set(t.sum(1).tolist()) == {1.0} and ((t == 0) | (t == 1)).all()  # vertices
    assert t.sum(0).min() > 900  # each drawn about a third of the time
    noisy = mmdc.mixture_targets(10, 3, 0.3, gen)
    assert torch.allclose(noisy.norm(dim=1), torch.ones(10))
    targets = torch.eye(4)
    pred = targets[[2, 0, 3, 1]] + 0.05  # image i is nearest target [2, 0, 3, 1][i]
    perm = mmdc.reassign(pred, targets)
    assert perm.tolist() == [2, 0, 3, 1]
    assert mmdc.target_loss(targets[perm], targets[perm]) == 0
    logits = torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0]])
    assert mmdc.rotation_loss(logits, torch.tensor([0, 1])) < 0.01


def test_mmdc_gives_a_small_folder_enough_steps() -> None:
    """The grey family's 50 epochs are 50 steps for 200 images: raised to its 2,000 steps
    (one an epoch here), the milestones scaled alike; large folders, a given ``epochs`` and
    colour images keep theirs."""
    method = mmdc.MMDC(5, mmdc.MMDCConfig())
    small = method.plan(1, 28, 200)
    assert (small.epochs, small.milestone, small.refine_epoch) == (2000, 1600, 800)
    assert method.plan(1, 28, 1000).epochs == 286  # 7 steps an epoch: 2,002 steps
    large = method.plan(1, 28, 70000)
    assert (large.epochs, large.milestone, large.refine_epoch) == (50, 40, 20)
    assert method.plan(1, 28).epochs == 50  # the folder's size not known
    assert mmdc.MMDC(5, mmdc.MMDCConfig(epochs=60)).plan(1, 28, 200).epochs == 60
    assert mmdc.MMDC(5, mmdc.MMDCConfig(min_steps=500)).plan(1, 28, 200).epochs == 500
    assert method.plan(3, 32, 200).epochs == 400  # colour: no floor yet


def test_mmdc_rejects_the_rotation_task_on_the_small_vgg() -> None:
    with pytest.raises(UsageError, match="rotation"):
        mmdc.MMDC(3, mmdc.MMDCConfig(network="vgg", rotation="on")).plan(1, 28)


def _with_and_without_graphs(
    method: str, params: dict[str, str], folder: Path, tmp_path: Path
) -> dict[str, Path]:
    """The run folders of one short GPU run with CUDA graphs and one without (seed 3)."""
    return {
        graphs: train(
            [folder],
            3,
            method=method,
            device="cuda",
            out=tmp_path / graphs,
            seed=3,
            params={**params, "cuda_graphs": graphs},
        ).run_dir
        for graphs in ("true", "false")
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_depict_replays_its_steps_as_cuda_graphs(folder: Path, tmp_path: Path) -> None:
    """Without dropout (the one random op) a captured DEPICT gives the eager one's labels."""
    params = {**SHORT["depict"], "dropout": "0", "init": "kmeans"}
    runs = _with_and_without_graphs("depict", params, folder, tmp_path)
    last = {r["phase"]: r.get("cuda_graph") for r in _log(runs["true"]) if "epoch" in r}
    # each phase's first steps warm up eagerly; by its last epoch the steps are replayed
    assert last == {"pretrain": "replayed", "head": "replayed", "depict": "replayed"}
    assert not any("cuda_graph" in r for r in _log(runs["false"]))
    same = _labels(runs["true"] / "labels.csv") == _labels(runs["false"] / "labels.csv")
    assert same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("colour,geometry", [(False, "affine"), (True, "affine"), (True, "cv2")])
def test_adc_replays_its_steps_as_cuda_graphs(
    colour: bool, geometry: str, folder: Path, tmp_path: Path
) -> None:
    """ADC's randomness is keyed (rng), so a captured step draws what the eager one draws:
    the first round's losses agree, and every round after the first is replayed (grey: conv
    net, torchvision jitter; colour: ResNet, TF jitter; the cv2 geometry's grid as well)."""
    if colour:
        folder = make_toy_folder(tmp_path / "colour", per_class=16, colour=True)
    params = {**SHORT["adc"], "geometry": geometry}
    runs = _with_and_without_graphs("adc", params, folder, tmp_path)
    logs = {graphs: [r for r in _log(run) if "epoch" in r] for graphs, run in runs.items()}
    statuses = [r.get("cuda_graph") for r in logs["true"]]
    assert statuses[-1] == "replayed" and statuses.count("replayed") >= len(statuses) - 2
    assert not any("cuda_graph" in r for r in logs["false"])
    first = logs["true"][0], logs["false"][0]
    for term in ("aug_walker", "aug_visit", "norm", "loss"):
        assert first[0][term] == pytest.approx(first[1][term], rel=2e-2)
    assert sum(logs["true"][-1]["sizes"]) == sum(logs["false"][-1]["sizes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_aecm_replays_its_steps_as_cuda_graphs(folder: Path, tmp_path: Path) -> None:
    """Pretraining and joint steps under replay (3 steps an epoch: the first epoch warms up
    eagerly, the next ones are captured); the averaging epoch stays eager. Nothing in a step
    is random, so the captured run follows the eager one: the same first epoch, and (but for
    the fused Adam's bias correction, on the device when captured) the same clusters."""
    # tol 0: all 5 joint epochs (on the H100 the labels settled after 4, and the run stopped)
    params = {**SHORT["aecm-pre"], "pre_clustering": "kmeans", "rollback": "0", "tol": "0"}
    runs = _with_and_without_graphs("aecm", params, folder, tmp_path)
    logs = {graphs: [r for r in _log(run) if "epoch" in r] for graphs, run in runs.items()}
    statuses = {(r["phase"], r["epoch"]): r.get("cuda_graph") for r in logs["true"]}
    assert statuses[("pretrain", 1)] == "eager" and statuses[("pretrain", 5)] == "replayed"
    assert statuses[("joint", 1)] == "eager" and statuses[("joint", 5)] == "replayed"
    assert statuses[("average", 1)] is None  # eager: no note
    assert not any("cuda_graph" in r for r in logs["false"])
    first = logs["true"][0], logs["false"][0]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-4)
    assert sum(logs["true"][-1]["sizes"]) == 48  # the captured counts add up
    labels = [_labels(run / "labels.csv") for run in runs.values()]
    assert sum(labels[0][p] == labels[1][p] for p in labels[0]) >= 0.9 * len(labels[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("colour", [False, True])
def test_mmdc_replays_its_steps_as_cuda_graphs(colour: bool, folder: Path, tmp_path: Path) -> None:
    """The predict and fit steps, and the refinement's in-place targets, under replay: the
    first epoch agrees with the eager run's, and the epochs after it are replayed (colour:
    ResNet-18 and its rotation steps, one SGD for both heads, every other epoch)."""
    # 3 steps an epoch: 3 eager warm-up calls, then captured; the learning rate's drop at
    # epoch 5 makes a new SGD step, captured anew
    params = {**SHORT["mmdc"], "epochs": "8", "refine_epoch": "3", "milestone": "5"}
    if colour:
        folder = make_toy_folder(tmp_path / "colour", per_class=16, colour=True)
        params["rotation_every"] = "2"
    runs = _with_and_without_graphs("mmdc", params, folder, tmp_path)
    logs = {graphs: [r for r in _log(run) if "epoch" in r] for graphs, run in runs.items()}
    replayed = [r.get("cuda_graph") == "replayed" for r in logs["true"]]
    assert replayed == [False, True, True, True, True, False, True, True]
    assert not any("cuda_graph" in r for r in logs["false"])
    assert logs["true"][0]["loss"] == pytest.approx(logs["false"][0]["loss"], rel=2e-2)
    assert sum(logs["true"][-1]["sizes"]) == sum(logs["false"][-1]["sizes"])
    if colour:
        assert ["rot" in r for r in logs["true"]] == [True, False] * 4
        assert logs["true"][0]["rot"] == pytest.approx(logs["false"][0]["rot"], rel=2e-2)
