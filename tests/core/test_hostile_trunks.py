"""Trunks that draw random numbers in training mode are refused at construction, naming the module.

Streaming recomputes every tile in the backward pass and replays the trace tile by tile, so a
draw inside the trunk would differ between tiles and passes (or, drawn once while tracing, be
frozen into every step). The same modules in eval mode, or with p=0, stream exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

from lightstream import StreamingCNN, UnsupportedLayerError
from tests.conftest import assert_streaming_exact


class NoiseInjection(nn.Module):
    """Gaussian noise on the feature map while training (a common augmentation)."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x) * self.sigma if self.training else x


class FunctionalDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=self.training)


class RandomChannelScale(nn.Module):
    """Scales channels by a random factor drawn in forward (an image-independent draw)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 0.1 * torch.rand(1, 4, 1, 1, dtype=x.dtype)) if self.training else x


class BernoulliMask(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.empty_like(x).bernoulli_(0.9) if self.training else x


class NormalJitter(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.zeros_like(x).normal_(0, 0.1) if self.training else x


@torch.fx.wrap
def _jitter_like(tensor: torch.Tensor) -> torch.Tensor:
    """A function fx does not trace into: its draw is seen only when it runs."""
    return tensor + 0.01 * torch.randn_like(tensor)


class WrappedJitter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (_jitter_like(self.bias) if self.training else self.bias)


class StochasticDepth(nn.Module):
    """A residual block with torchvision's stochastic depth (fx keeps its call opaque)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(4, 4, 3, padding=1), TorchvisionStochasticDepth(p, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.conv(x))


def _trunk(middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), middle, nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))


RANDOM = [
    ("noise-injection", NoiseInjection(), "1 (randn_like)", "randn_like"),
    ("functional-dropout", FunctionalDropout(0.2), "1 (dropout)", "dropout() in training mode"),
    ("rrelu", nn.RReLU(), "1", "RReLU in training mode"),
    ("torch-rand", RandomChannelScale(), "1 (rand)", "rand()"),
    ("bernoulli", BernoulliMask(), "1 (bernoulli_)", ".bernoulli_()"),
    ("normal", NormalJitter(), "1 (normal_)", ".normal_()"),
    ("wrapped-function", WrappedJitter(), "1 (_jitter_like)", "randn_like"),
    ("stochastic-depth", StochasticDepth(0.5), "1.drop (stochastic_depth)", "stochastic_depth() in training mode"),
    ("dropout2d", nn.Dropout2d(0.1), "1", "Dropout2d in training mode"),
]


@pytest.mark.parametrize(("middle", "path", "what"), [case[1:] for case in RANDOM], ids=[c[0] for c in RANDOM])
def test_random_draws_in_training_mode_are_refused_naming_the_module(middle: nn.Module, path: str, what: str
                                                                      ) -> None:
    with pytest.raises(UnsupportedLayerError) as info:
        StreamingCNN(_trunk(middle).train(), tile_size=32)
    assert info.value.path == path
    message = str(info.value)
    assert f"cannot stream layer '{path}'" in message
    assert f"draws random numbers ({what}" in message
    assert "call .eval() on it" in message and "p=0" in message


@pytest.mark.parametrize("middle", [case[1] for case in RANDOM], ids=[c[0] for c in RANDOM])
def test_the_same_modules_in_eval_mode_stream_exactly(middle: nn.Module) -> None:
    assert_streaming_exact(_trunk(middle).double().eval(), torch.randn(2, 3, 40, 36, dtype=torch.float64), 24)


def test_dropout_with_p_zero_in_training_mode_streams_exactly() -> None:
    trunk = _trunk(nn.Sequential(nn.Dropout(0.0), FunctionalDropout(0.0), StochasticDepth(0.0))).double().train()
    assert_streaming_exact(trunk, torch.randn(2, 3, 40, 36, dtype=torch.float64), 24)


def test_a_random_draw_is_reported_instead_of_the_size_read_that_feeds_it() -> None:
    # x.shape (not local on its own) is read before torch.randn: the refusal names the draw
    class ShapedNoise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn(x.shape, dtype=x.dtype)

    with pytest.raises(UnsupportedLayerError, match=r"layer '1 \(randn\)': it draws random numbers"):
        StreamingCNN(_trunk(ShapedNoise()).eval(), tile_size=32)
