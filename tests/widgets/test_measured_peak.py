"""The tuner's measured tensor peak agrees with the estimate it shows (ResNet-18, 2048², 512-px tiles)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightstream import StreamingCNN
from lightstream.core.memory import TensorPeak
from lightstream.widgets import TileTunerModel


def test_tensor_peak_counts_what_tensors_hold_during_the_block() -> None:
    kept = torch.zeros(1 << 20)  # allocated before: not counted
    with TensorPeak("cpu") as peak:
        a = torch.empty(1 << 20)  # 4 MiB held to the end
        b = torch.empty(2 << 20)  # 8 MiB, freed: the peak is 12 MiB
        del b
        c = torch.empty(1 << 20)  # 4 MiB more: held 8 MiB, still under the peak
    assert peak.bytes == 12 << 20
    del a, c, kept


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_resnet18_measured_peak_is_within_a_quarter_of_the_estimate(device: str) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2]).eval().to(device)
    image = torch.rand(1, 3, 2048, 2048)
    model = TileTunerModel(trunk, image, tile_size=512)
    estimate = StreamingCNN(trunk, tile_size=512).estimate(image.shape)
    assert model.estimate == estimate
    measured = model.measure_step()
    assert measured is not None and measured.backward
    assert abs(measured.peak_bytes / estimate.peak_bytes - 1) <= 0.25, (measured.peak_bytes, estimate.peak_bytes)
