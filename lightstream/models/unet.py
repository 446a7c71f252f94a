"""Streamable U-Nets: a plain U-Net and a U-Net on a torchvision ResNet encoder.

Both are trunks whose output is the full-resolution logit map ``[B, num_classes, H, W]``
(output stride 1), for :class:`~lightstream.modules.ImageSegmenter` or
:class:`~lightstream.core.StreamingCNN` directly. Every layer is local (convolutions, max
pooling, upsampling, concatenated skips), so the engine streams them exactly.

Normalisation: BatchNorm in training mode normalises with statistics of the whole image, which
tiles cannot reproduce, and GroupNorm/InstanceNorm normalise over all positions too. The plain
:class:`UNet` therefore has no normalisation layers (convolution + ReLU blocks, Kaiming
initialisation); the ResNet encoder keeps torchvision's BatchNorm layers, which
:class:`~lightstream.modules.StreamingModule` keeps in eval mode (running statistics; their
affine weights still train), as for classification.

Sizes: every level halves the map with a 2x2 max pooling (or a stride-2 layer) and the decoder
concatenates each upsampled map with the skip of the same level, so the image's height and width
must be multiples of ``size_multiple`` (``2 ** depth``), as for any U-Net; crop or pad slides
to it (e.g. ``SlideDataset(stride=model.size_multiple)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from ._torchvision import build_network, normalization_defaults
from .resnet import RESNET_NAMES

__all__ = ["DECODER_CHANNELS", "UPSAMPLING_MODES", "ResNetUNet", "UNet", "double_conv", "resnet_unet", "upsample"]

DECODER_CHANNELS = (256, 128, 64, 32, 16)
"""Default decoder widths of :class:`ResNetUNet`, deepest first (segmentation-models' ``Unet``'s)."""

Upsampling = Literal["transpose", "bilinear", "nearest", "pixel_shuffle"]

UPSAMPLING_MODES = ("transpose", "bilinear", "nearest", "pixel_shuffle")
"""How the decoder doubles a map's resolution: a 2x2 stride-2 transposed convolution, bilinear or
nearest upsampling followed by a 1x1 convolution, or a 1x1 convolution followed by ``PixelShuffle(2)``."""


def _conv_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # no normalisation: keep the scale through depth
    nn.init.zeros_(conv.bias)
    return [conv, nn.ReLU()]


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convolutions (padding 1) with ReLU: a U-Net level's block, without normalisation."""
    return nn.Sequential(*_conv_relu(in_channels, out_channels), *_conv_relu(out_channels, out_channels))


def upsample(in_channels: int, out_channels: int, mode: Upsampling) -> nn.Module:
    """Double the resolution and map ``in_channels`` to ``out_channels`` (see :data:`UPSAMPLING_MODES`)."""
    if mode == "transpose":
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    if mode in ("bilinear", "nearest"):
        return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(in_channels, out_channels, 1))
    if mode == "pixel_shuffle":
        return nn.Sequential(nn.Conv2d(in_channels, 4 * out_channels, 1), nn.PixelShuffle(2))
    raise ValueError(f"up must be one of {UPSAMPLING_MODES}, got {mode!r}")


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. (2015) with padded convolutions, streamable.

    ``depth`` times: a :func:`double_conv` block, then 2x2 max pooling (the channels double per
    level, starting at ``width``); a bottom block; then ``depth`` decoder levels, each upsampling
    (``up``, see :data:`UPSAMPLING_MODES`), concatenating the encoder's map of the same level and
    applying a :func:`double_conv` block; a 1x1 convolution gives ``num_classes`` logits per pixel.

    Args:
        in_channels: image channels.
        num_classes: output channels (logits per pixel).
        depth: number of poolings; the input's height and width must be multiples of ``2 ** depth``.
        width: channels of the first level (the original U-Net has 64).
        up: how the decoder upsamples.

    >>> unet = UNet(3, num_classes=2, depth=3, width=16)
    >>> unet(torch.zeros(1, 3, 64, 48)).shape
    torch.Size([1, 2, 64, 48])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, depth: int = 4, width: int = 32,
                 up: Upsampling = "transpose") -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("depth", depth),
                            ("width", width)):
            _check_positive(name, value)
        widths = [width * 2 ** level for level in range(depth + 1)]
        self.size_multiple = 2 ** depth
        self.encoders = nn.ModuleList([double_conv(in_channels, widths[0])] +
                                      [double_conv(widths[level - 1], widths[level]) for level in range(1, depth + 1)])
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(upsample(widths[level + 1], widths[level], up) for level in reversed(range(depth)))
        self.decoders = nn.ModuleList(double_conv(2 * widths[level], widths[level]) for level in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.classifier(x)


class ResNetUNet(nn.Module):
    """A U-Net whose encoder is a torchvision ResNet (as in segmentation-models' ``Unet``).

    Encoder stages, by stride: 2 (``conv1 bn1 relu``), 4 (``maxpool layer1``), 8 (``layer2``),
    16 (``layer3``), 32 (``layer4``); the first ``encoder_depth`` of them are used. The decoder
    upsamples the deepest map ``encoder_depth`` times back to the image's resolution; each step
    concatenates the encoder's map of the same stride (none at stride 1) and applies a
    :func:`double_conv` block of ``decoder_channels[i]`` channels (default: the last
    ``encoder_depth`` of :data:`DECODER_CHANNELS`). A 1x1 convolution gives the logits.
    Build it with :func:`resnet_unet`.

    Attributes:
        size_multiple: ``2 ** encoder_depth``; image sizes must be multiples of it.
        mean, std: the pretrained weights' normalisation (for float images in ``[0, 1]``; times 255
            for ``uint8`` slides), to pass to the segmenter; ``None`` without weights.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, encoder_depth: int = 5,
                 decoder_channels: Sequence[int] | None = None, up: Upsampling = "transpose") -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        if isinstance(encoder_depth, bool) or encoder_depth not in range(1, 6):
            raise ValueError(f"encoder_depth must be 1..5 (the ResNet's stages), got {encoder_depth!r}")
        if decoder_channels is None:
            decoder_channels = DECODER_CHANNELS[len(DECODER_CHANNELS) - encoder_depth:]
        if len(decoder_channels) != encoder_depth:
            raise ValueError(f"decoder_channels needs one entry per encoder stage ({encoder_depth}), "
                             f"got {tuple(decoder_channels)}")
        for channels in decoder_channels:
            _check_positive("decoder_channels entries", channels)
        stages = [nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu),
                  nn.Sequential(encoder.maxpool, encoder.layer1), encoder.layer2, encoder.layer3, encoder.layer4]
        self.encoder = nn.ModuleList(stages[:encoder_depth])
        skip_channels = [_out_channels(stage) for stage in self.encoder]
        self.size_multiple = 2 ** encoder_depth
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        in_channels = skip_channels[-1]
        for step, out_channels in enumerate(decoder_channels):
            skip = skip_channels[-2 - step] if step < encoder_depth - 1 else 0  # no skip at stride 1
            self.ups.append(upsample(in_channels, out_channels, up))
            self.decoders.append(double_conv(out_channels + skip, out_channels))
            in_channels = out_channels
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, decoder in zip(self.ups, self.decoders):
            x = up(x)
            x = decoder(torch.cat([x, skips.pop()], dim=1) if skips else x)
        return self.classifier(x)


def _out_channels(stage: nn.Module) -> int:
    """Channels a ResNet stage outputs: those of its last convolution (BasicBlock or Bottleneck)."""
    return [layer for layer in stage.modules() if isinstance(layer, nn.Conv2d)][-1].out_channels


def resnet_unet(model_name: str = "resnet18", num_classes: int = 2, weights: WeightsEnum | str | None = None, *,
                encoder_depth: int = 5, decoder_channels: Sequence[int] | None = None,
                up: Upsampling = "transpose") -> ResNetUNet:
    """A :class:`ResNetUNet` on torchvision's ``model_name`` (one of :data:`~lightstream.models.RESNET_NAMES`).

    ``weights`` (``None``, ``"DEFAULT"``, ``"IMAGENET1K_V1"`` or a weights enum) is passed to
    torchvision, which downloads it once; the model's ``mean``/``std`` are then the weights'
    preprocessing statistics. ``decoder_channels`` has one entry per encoder stage used (default:
    the last ``encoder_depth`` of :data:`DECODER_CHANNELS`, e.g. ``(64, 32, 16)`` for 3).

    >>> model = resnet_unet("resnet18", num_classes=3, encoder_depth=3, decoder_channels=(32, 16, 8))
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 3, 64, 64])
    """
    if model_name not in RESNET_NAMES:
        raise ValueError(f"model_name must be one of {RESNET_NAMES}, got {model_name!r}")
    encoder, resolved = build_network(model_name, weights, num_classes=1000)
    model = ResNetUNet(encoder, num_classes, encoder_depth, decoder_channels, up)
    statistics = normalization_defaults(resolved, {})
    if statistics:
        model.mean, model.std = statistics["mean"], statistics["std"]
    return model
