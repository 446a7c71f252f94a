"""Ready streaming backbones built from torchvision classifiers, split into trunk and head."""

from .backbone import BACKBONE_NAMES, Backbone, build_backbone
from .convnext import CONVNEXT_NAMES, StreamingConvNext, split_convnext
from .mobilenet import StreamingMobileNetV2, split_mobilenet_v2
from .resnet import RESNET_NAMES, StreamingResNet, split_resnet
from .slide_models import SlideAttentionMIL, SlideClassifier
from .unet import DECODER_CHANNELS, UPSAMPLING_MODES, ResNetUNet, UNet, resnet_unet

__all__ = [
    "BACKBONE_NAMES",
    "CONVNEXT_NAMES",
    "DECODER_CHANNELS",
    "RESNET_NAMES",
    "UPSAMPLING_MODES",
    "Backbone",
    "ResNetUNet",
    "SlideAttentionMIL",
    "SlideClassifier",
    "StreamingConvNext",
    "StreamingMobileNetV2",
    "StreamingResNet",
    "UNet",
    "build_backbone",
    "resnet_unet",
    "split_convnext",
    "split_mobilenet_v2",
    "split_resnet",
]
