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
