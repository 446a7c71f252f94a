"""Ready streaming backbones built from torchvision classifiers, split into trunk and head."""

from .convnext import CONVNEXT_NAMES, StreamingConvNext, split_convnext
from .mobilenet import StreamingMobileNetV2, split_mobilenet_v2
from .resnet import RESNET_NAMES, StreamingResNet, split_resnet

__all__ = [
    "CONVNEXT_NAMES", "RESNET_NAMES", "StreamingConvNext", "StreamingMobileNetV2", "StreamingResNet",
    "split_convnext", "split_mobilenet_v2", "split_resnet",
]
