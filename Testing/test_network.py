"""The residual U-Net: shapes, layer counts, configuration."""

from __future__ import annotations

import pytest
import torch

from CMBDetectLib.detection.network import NetworkConfig, ResUNet, count_layers


@pytest.mark.parametrize("size", [(384, 384), (128, 128), (100, 72)])
def test_three_slices_in_one_slice_out(size):
    net = ResUNet(NetworkConfig(base_channels=4)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *size)


def test_architecture_matches_the_paper_at_64_channels():
    net = ResUNet(NetworkConfig())
    counts = count_layers(net)
    assert counts["residual_blocks"] == 6
    assert 24 <= counts["conv_layers"] <= 30  # the paper: 28 layers in all
    assert net.encoder[0][0][0].out_channels == 64
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) > 20


def test_width_is_configurable_and_costs_quadratically():
    p16 = count_layers(ResUNet(NetworkConfig(base_channels=16)))["parameters"]
    p32 = count_layers(ResUNet(NetworkConfig(base_channels=32)))["parameters"]
    assert 3.5 < p32 / p16 < 4.1


def test_centre_slice_matters_most_and_neighbours_count():
    """The input channels are slices i-1, i, i+1: changing a neighbour changes the output."""
    torch.manual_seed(0)
    net = ResUNet(NetworkConfig(base_channels=4)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        base = net(x)
        y = x.clone()
        y[:, 0] = 0
        assert not torch.allclose(net(y), base)


def test_config_round_trip():
    c = NetworkConfig(base_channels=24, levels=3)
    assert NetworkConfig.from_dict(c.as_dict()) == c
    with pytest.raises(ValueError):
        ResUNet(NetworkConfig(levels=1))
