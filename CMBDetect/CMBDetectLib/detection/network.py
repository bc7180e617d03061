"""The paper's residual U-Net: 3 consecutive slices in, the centre slice's probability out.

Fan et al. 2022, Figure 1: 3 resolution levels, 6 residual blocks, batch normalisation,
bilinear upsampling, skip connections, 64 channels at the top level, 28 layers. The paper
does not list the layers one by one; this is our reading of it:

    level 0 (C ch)  ──double conv─residual block──────────────────skip──┐
    level 1 (2C)       └pool─double conv─residual block─────────skip─┐   │
    level 2 (4C)          └pool─double conv─residual block x2        │   │
                               └bilinear up─conv─concat─double conv─residual block
                                             └bilinear up─conv─concat─double conv─residual block─1x1 conv

25 convolutions and 6 residual blocks at 3 levels. The width C is configurable: the paper's
64 costs 16x the compute of C=16 (see docs and `cmbdetect benchmark`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .configs import NetworkConfig


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the input (He et al.)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(x + y, inplace=True)


class EncoderLevel(nn.Sequential):
    def __init__(self, cin: int, cout: int, residual_blocks: int = 1) -> None:
        super().__init__(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout), *[ResidualBlock(cout) for _ in range(residual_blocks)])


class DecoderLevel(nn.Module):
    """Bilinear upsampling, a convolution to halve the channels, the skip concatenated, fused."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(cin, cout)
        self.fuse = nn.Sequential(conv_bn_relu(2 * cout, cout), conv_bn_relu(cout, cout), ResidualBlock(cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([skip, self.reduce(x)], dim=1))


class ResUNet(nn.Module):
    """2.5D residual U-Net. Input (N, 3, H, W) slices i-1, i, i+1; output (N, 1, H, W) logits for slice i."""

    def __init__(self, config: NetworkConfig = NetworkConfig()) -> None:
        super().__init__()
        if config.levels < 2:
            raise ValueError("the U-Net needs at least 2 resolution levels")
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.levels)]
        cins = [config.in_slices] + widths[:-1]
        # The deepest level carries two residual blocks, which makes the paper's six at three levels.
        self.encoder = nn.ModuleList(
            EncoderLevel(cin, cout, 2 if i == config.levels - 1 else 1) for i, (cin, cout) in enumerate(zip(cins, widths))
        )
        self.decoder = nn.ModuleList(DecoderLevel(widths[i + 1], widths[i]) for i in reversed(range(config.levels - 1)))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, level in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = level(x)
            skips.append(x)
        for level, skip in zip(self.decoder, reversed(skips[:-1])):
            x = level(x, skip)
        return self.head(x)


def count_layers(model: nn.Module) -> dict[str, int]:
    return {
        "conv_layers": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
        "residual_blocks": sum(isinstance(m, ResidualBlock) for m in model.modules()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


class Probability(nn.Module):
    """The network followed by the sigmoid, centre channel only: what every engine returns."""

    def __init__(self, network: ResUNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(x).float())[:, 0]
