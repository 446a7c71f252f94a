"""Ready streaming backbones built from torchvision classifiers, split into trunk and head."""

from .backbone import BACKBONE_NAMES, Backbone, build_backbone
from .convnext import CONVNEXT_NAMES, StreamingConvNext, split_convnext
from .mobilenet import StreamingMobileNetV2, split_mobilenet_v2
from .resnet import RESNET_NAMES, StreamingResNet, split_resnet
from .slide_models import SlideAttentionMIL, SlideClassifier

__all__ = [
    "BACKBONE_NAMES", "Backbone", "CONVNEXT_NAMES", "RESNET_NAMES", "SlideAttentionMIL", "SlideClassifier",
    "StreamingConvNext", "StreamingMobileNetV2", "StreamingResNet", "build_backbone", "split_convnext",
    "split_mobilenet_v2", "split_resnet",
]
