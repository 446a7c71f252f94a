"""Hostile inputs to the ready backbones: refused before any network is built."""

from __future__ import annotations

import pytest

from lightstream.models import StreamingConvNext, StreamingMobileNetV2, StreamingResNet

BUILDS = {
    "resnet18": lambda **kw: StreamingResNet("resnet18", 512, **kw),
    "convnext_tiny": lambda **kw: StreamingConvNext("convnext_tiny", 1688, **kw),
    "mobilenet_v2": lambda **kw: StreamingMobileNetV2(512, **kw),
}


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
@pytest.mark.parametrize("name", list(BUILDS))
def test_num_classes_must_be_a_positive_integer(name: str, num_classes) -> None:
    with pytest.raises(ValueError, match=rf"num_classes must be a positive integer, got {num_classes!r}"):
        BUILDS[name](num_classes=num_classes)


def test_an_unknown_convnext_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"model_name must be one of \('convnext_tiny', .*got 'convnext_huge'"):
        StreamingConvNext("convnext_huge", 1688)
