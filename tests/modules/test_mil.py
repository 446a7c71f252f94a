"""Attention MIL: the streamed trunk's gradients under the MIL head equal whole-image ones in float64;
attention is a distribution over feature-map cells; the instance loss uses the most/least attended cells."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightstream.modules import AttentionMIL, GatedAttentionMIL, MILOutput, SlideOutput
from streaming_helpers import TILE, image_data, loader, quiet_trainer, tiny_trunk


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error; a gradient that is zero in exact arithmetic (the attention score's bias: softmax
    ignores a shift) is compared absolutely, to rounding noise."""
    return ((actual - expected).norm() / max(expected.norm().item(), 1e-5)).item()


def test_streamed_training_step_gradients_equal_the_whole_image_in_float64() -> None:
    trunk = tiny_trunk()
    images, targets = image_data(2).tensors  # 36 x 28 images: 3 x 3 tiles of 16 px
    model = AttentionMIL(copy.deepcopy(trunk), TILE, feature_channels=5, num_classes=3, embed_dim=6,
                         attention_dim=4, instance_classifier=True, instance_k=3, instance_loss_weight=0.4).double()
    assert min(model.stream_network.plan(images.shape).grid) >= 3
    reference_trunk, reference_head = copy.deepcopy(trunk).eval(), copy.deepcopy(model.head)
    model.train()

    streamed_image = images.clone().requires_grad_()
    model.training_step((streamed_image, targets), 0).backward()

    reference_image = images.clone().requires_grad_()
    output = reference_head.attend(reference_trunk(reference_image))
    bag_loss = nn.functional.cross_entropy(output.logits, targets)
    loss = 0.6 * bag_loss + 0.4 * GatedAttentionMIL.instance_loss(output, targets, 3)
    loss.backward()

    assert _relative(model.last_output.logits, output.logits) <= 1e-10
    assert _relative(model.last_output.attention, output.attention) <= 1e-10
    pairs = [*zip(model.stream_network.stream_module.named_parameters(), reference_trunk.parameters()),
             *zip(model.head.named_parameters(), reference_head.parameters())]
    assert len(pairs) == 8 + 12  # trunk: 3 convs and BN; head: 6 linear layers
    for (name, got), expected in pairs:
        assert _relative(got.grad, expected.grad) <= 1e-10, name
    assert _relative(streamed_image.grad, reference_image.grad) <= 1e-10


def test_attention_is_a_distribution_over_the_feature_map_cells() -> None:
    head = GatedAttentionMIL(5, num_classes=2, embed_dim=8, attention_dim=4).double()
    feature_map = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    output = head.attend(feature_map)
    assert output.logits.shape == (3, 2) and output.attention.shape == (3, 4, 6)
    assert torch.allclose(output.attention.sum((1, 2)), torch.ones(3, dtype=torch.float64))
    # the bag is the attention-weighted mean of the embedded cells
    embedded = head.embed(feature_map.flatten(2).transpose(1, 2))
    bag = (output.attention.flatten(1)[..., None] * embedded).sum(1)
    assert torch.allclose(output.logits, head.classifier(bag))
    assert torch.equal(head(feature_map), output.logits)


def test_instance_loss_labels_the_top_k_cells_in_class_and_the_bottom_k_not() -> None:
    attention = torch.tensor([[[0.1, 0.4], [0.2, 0.3]]])  # cells by attention: 1, 3, 2, 0
    instance_logits = torch.randn(1, 4, 2, 2)
    output = MILOutput(torch.zeros(1, 2), attention, instance_logits)
    target = torch.tensor([1])
    expected = nn.functional.cross_entropy(instance_logits[0, [1, 0], 1], torch.tensor([1, 0]))
    assert torch.allclose(GatedAttentionMIL.instance_loss(output, target, 1), expected)


def test_predict_returns_the_attention_map_with_the_output_stride() -> None:
    model = AttentionMIL(tiny_trunk(), TILE, feature_channels=5, num_classes=3, embed_dim=6).double()
    data = image_data(2)
    outputs = quiet_trainer().predict(model, loader(data, 2))
    assert isinstance(outputs[0], SlideOutput) and outputs[0].heatmap_kind == "attention"
    assert outputs[0].heatmap.shape == (2, 9, 7) and outputs[0].output_stride == (4, 4)
    with torch.no_grad():
        expected = model.head.attend(tiny_trunk().eval()(data.tensors[0]))
    assert _relative(outputs[0].logits, expected.logits) <= 1e-10
    assert _relative(outputs[0].heatmap, expected.attention) <= 1e-10
