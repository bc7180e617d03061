"""The candidate classifier: a small 3D CNN that looks at one candidate and names what it is.

Stage 2 of the two-stage detector (DESIGN.md section 9; Dou et al. 2016, Al-Masni et al.
2020 use the same idea). Its input is a patch resampled to isotropic voxels around a
candidate's centroid; its output is a softmax over six classes: a microbleed, or one of the
mimics that fool the U-Net (a vein cut across, a calcification, an iron-rich deep nucleus,
an air-tissue edge) or anything else. P(microbleed) is the first output.

Three convolution blocks (two 3x3x3 convolutions with batch normalisation each, 2x max
pooling between them), global average and max pooling, one linear layer. At 16^3 voxels and
width 8 that is about 15 MFLOP per candidate: a case's few dozen candidates cost a fraction of
a second on a CPU, against about 14 s for the U-Net. (Width and patch were cut from 12 and
24^3 when the shared 2-core CPU could not train the larger network in the time there was.)
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import ClassifierConfig


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class CandidateNet(nn.Module):
    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        c = self.config
        layers: list[nn.Module] = []
        cin = c.in_channels
        for b in range(c.blocks):
            cout = c.width * 2**b
            if b:
                layers.append(nn.MaxPool3d(2))
            layers.append(_block(cin, cout))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.3)
        # Average and max pooling both: a 2-voxel bleed is a small part of the patch, and the
        # average alone would dilute it.
        self.head = nn.Linear(2 * cin, c.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes) for patches (N, in_channels, S, S, S)."""
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)
        return self.head(self.dropout(pooled))


class Verdicts(nn.Module):
    """The classifier followed by the softmax: what its engines return (engines.py)."""

    def __init__(self, network: CandidateNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(x), dim=1)
