from __future__ import annotations

import pytest
import torch

from imgcluster import nets


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 16), (3, 64)])
def test_conv_nets_are_sized_from_the_image(channels: int, size: int) -> None:
    x = torch.rand(2, channels, size, size)
    vgg = nets.SmallVGG(channels, size, out_dim=10)
    assert vgg(x).shape == (2, 10)
    assert torch.allclose(vgg(x).norm(dim=1), torch.ones(2), atol=1e-5)
    assert nets.ADCConvNet(channels, size, emb_size=128)(x).shape == (2, 128)
    assert nets.PreActResNet20(channels, emb_size=64)(x).shape == (2, 64)
    resnet = nets.SmallResNet(channels, out_dim=10, rotation_head=True)
    assert resnet(x).shape == (2, 10) and resnet.rotation_logits(x).shape == (2, 4)


@pytest.mark.parametrize("size", [16, 28, 32, 55, 64])
def test_depict_autoencoder_mirrors_its_encoder(size: int) -> None:
    ae = nets.DepictAE(1, size, k=10)
    x = torch.rand(3, 1, size, size) * 2 - 1
    h1, h2, z = ae.encode(x, noisy=True)
    d2, d1, xhat = ae.decode(z)
    assert z.shape == (3, 10) and z.abs().max() <= 1
    assert d2.shape == h2.shape and d1.shape == h1.shape and xhat.shape == x.shape


def test_depict_noisy_pathway_differs_and_clean_is_deterministic() -> None:
    ae = nets.DepictAE(1, 28, k=10)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(ae.encode(x, noisy=False)[2], ae.encode(x, noisy=False)[2])
    assert not torch.equal(ae.encode(x, noisy=False)[2], ae.encode(x, noisy=True)[2])


@pytest.mark.parametrize("size", [16, 28, 32])
def test_depict_batched_pathways_equal_two_encoder_passes(size: int) -> None:
    """The GPU's one-batch clean + noisy pass: the same dropout masks, and the same activations
    and gradients up to the order of float sums."""
    ae = nets.DepictAE(1, size, k=10)
    x = torch.rand(8, 1, size, size) * 2 - 1

    def run(encode):  # a DEPICT-like loss on both pathways, and its gradients
        torch.manual_seed(3)
        clean, noisy = encode()
        loss = (ae.decode(noisy[2])[2] - x).pow(2).mean() + (noisy[2] - clean[2]).pow(2).mean()
        return [*clean, *noisy], torch.autograd.grad(loss, list(ae.parameters()))

    two, grads_two = run(lambda: (ae.encode(x, noisy=False), ae.encode(x, noisy=True)))
    one, grads_one = run(lambda: ae._encode_batched(x))
    # the same masks; the values up to the order of float sums (a convolution over 16 images
    # may take another CPU kernel than over 8: bit-equal on an AMD EPYC, not on an Intel Xeon)
    for a, b in zip(two, one, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(one[2], one[5])  # the noisy half did get its dropout
    for a, b in zip(grads_two, grads_one, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_depict_geometry_matches_the_authors_choices() -> None:
    assert nets.depict_geometry(28) == ((4, 5), (0, 2))
    assert nets.depict_geometry(16) == ((4, 5), (0, 2))
    assert nets.depict_geometry(32) == ((4, 5), (2, 2))
    assert nets.depict_geometry(55) == ((5, 4), (2, 0))


def test_mlp_autoencoder_shapes() -> None:
    ae = nets.MLPAutoencoder(784, 10)
    x = torch.rand(5, 1, 28, 28)
    z = ae(x)
    assert z.shape == (5, 10) and ae.reconstruct(z).shape == (5, 784)
    widths = [m.out_features for m in ae.encoder if isinstance(m, torch.nn.Linear)]
    assert widths == [500, 500, 2000, 10]


def test_nets_rebuild_from_their_spec() -> None:
    for net in (
        nets.SmallVGG(1, 28, 10),
        nets.SmallResNet(3, 10),
        nets.ADCConvNet(1, 28),
        nets.PreActResNet20(3),
        nets.DepictAE(1, 28, 10),
        nets.MLPAutoencoder(784, 10),
    ):
        again = type(net)(**net.spec())
        assert sum(p.numel() for p in again.parameters()) == sum(
            p.numel() for p in net.parameters()
        )
        again.load_state_dict(net.state_dict())


def test_resnet18_has_the_usual_size() -> None:
    params = sum(p.numel() for p in nets.SmallResNet(3, 10).parameters())
    assert 11_000_000 < params < 11_300_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the batched pathways run on a GPU")
def test_depict_pathways_on_a_gpu_are_one_batch_with_the_same_masks() -> None:
    ae = nets.DepictAE(1, 28, k=10).cuda()
    x = torch.rand(100, 1, 28, 28, device="cuda") * 2 - 1
    torch.manual_seed(3)
    two = [*ae.encode(x, noisy=False), *ae.encode(x, noisy=True)]
    torch.manual_seed(3)
    one = [t for pathway in ae.encode_pair(x) for t in pathway]
    # cuDNN may pick another algorithm (TF32) for a batch of 200; a different dropout mask
    # would move activations by tenths, not thousandths
    for a, b in zip(two, one, strict=True):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2)


def test_adc_resnet_starts_and_averages_as_tf_official_resnet() -> None:
    torch.manual_seed(0)
    net = nets.PreActResNet20(3, emb_size=64)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 19 and all(m.momentum == 0.003 for m in norms)  # TF decay 0.997
    conv = net.blocks[-1].conv2  # 64 × 64 × 3 × 3: fan_in 576
    std = 576**-0.5
    assert abs(conv.weight.std().item() - 0.88 * std) < 0.1 * std  # truncated at 2σ
    assert conv.weight.abs().max() <= 2 * std + 1e-6
