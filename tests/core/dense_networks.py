"""Small segmentation networks for the dense-output tests: U-Nets, an FPN, a ResNet-18 U-Net."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from tests.conftest import randomise_batch_norm

__all__ = ["ResNet18UNet", "TinyFPN", "TinyUNet", "randomise_batch_norm"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyUNet(nn.Module):
    """Two levels down, two up: a transposed convolution, then ``up`` (bilinear, nearest or
    pixel shuffle), concatenated skips, a 1x1 classifier at full resolution."""

    def __init__(self, up: str) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = _block(3, 4), _block(4, 6), _block(6, 8)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.dec2 = _block(12, 6)
        if up == "pixel_shuffle":
            self.up1 = nn.Sequential(nn.Conv2d(6, 16, 1), nn.PixelShuffle(2))
        else:
            self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode=up), nn.Conv2d(6, 4, 1))
        self.dec1 = _block(8, 4)
        self.classify = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.classify(d1)


class TinyFPN(nn.Module):
    """Feature-pyramid top-down path: lateral 1x1 convolutions added to upsampled coarser maps."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = _block(3, 4)
        self.c2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.lat1, self.lat2, self.lat3 = nn.Conv2d(4, 5, 1), nn.Conv2d(6, 5, 1), nn.Conv2d(8, 5, 1)
        self.smooth = nn.Conv2d(5, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.c1(x)
        c2 = self.c2(c1)
        c3 = self.c3(c2)
        p3 = self.lat3(c3)
        p2 = self.lat2(c2) + F.interpolate(p3, scale_factor=2, mode="nearest")
        p1 = self.lat1(c1) + F.interpolate(p2, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.smooth(p1)


class ResNet18UNet(nn.Module):
    """A U-Net on a torchvision ResNet-18 encoder (strides 2..32), decoded back to the image
    through narrow decoder blocks (the encoder is the part that sets the receptive field)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        net = resnet18(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool, self.layers = net.maxpool, nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        skips = [64, 64, 128, 256]
        self.ups = nn.ModuleList([nn.ConvTranspose2d(512, width, 2, stride=2)] +
                                 [nn.ConvTranspose2d(width, width, 2, stride=2) for _ in range(3)])
        self.decs = nn.ModuleList(_block(width + skips[i], width) for i in (3, 2, 1, 0))
        self.final = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(width, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]  # stride 2
        y = self.pool(skips[0])
        for layer in self.layers:  # strides 4, 8, 16, 32
            y = layer(y)
            skips.append(y)
        y = skips.pop()
        for up, dec in zip(self.ups, self.decs):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        return self.final(y)
