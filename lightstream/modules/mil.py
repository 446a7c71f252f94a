"""Attention-based multiple-instance learning over a streamed feature map.

Every cell of the stitched feature map is an *instance* (a patch of ``output_stride`` pixels
seen through the trunk's receptive field); the slide is the *bag*. Gated attention pooling
(Ilse et al. 2018, the single-branch head of CLAM) weighs the instances, and the bag's class is
predicted from their weighted mean. The attention weights form a map over the slide: where the
model looked. Optionally, as in CLAM, an instance classifier is trained on the most and least
attended instances (pseudo-labels from the bag's class), which sharpens the attention.

The head is ordinary autograd on the feature map, so the trunk is trained end to end through
the streamed backward exactly as under :class:`~lightstream.modules.ImageClassifier`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .classifier import ImageClassifier, MetricsArg, _image_and_target
from .heads import SlideOutput

__all__ = ["AttentionMIL", "GatedAttentionMIL", "MILOutput"]


@dataclass
class MILOutput:
    """What :meth:`GatedAttentionMIL.attend` computes.

    Attributes:
        logits: ``[B, classes]`` bag logits.
        attention: ``[B, h, w]`` attention weights over the feature-map cells (each map sums to 1).
        instance_logits: ``[B, h * w, classes, 2]`` per-class "in class / not" logits of every
            instance, or ``None`` without an instance classifier.
    """

    logits: Tensor
    attention: Tensor
    instance_logits: Tensor | None


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling over the cells of a ``[B, C, h, w]`` feature map, then a linear classifier.

    Each cell's ``C`` features are embedded (linear, ReLU, dropout) to ``h_i``; its attention score
    is ``w . (tanh(V h_i) * sigmoid(U h_i))``, softmax-normalised over the cells; the bag
    embedding is the attention-weighted sum of the ``h_i``.

    Args:
        in_channels: ``C``.
        num_classes: bag classes.
        embed_dim: size of the instance embedding.
        attention_dim: hidden size of the gated attention.
        dropout: dropout on the instance embedding (training only).
        instance_classifier: add CLAM's per-class instance classifiers (see :meth:`instance_loss`).
    """

    def __init__(self, in_channels: int, num_classes: int = 2, embed_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.0, instance_classifier: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Sequential(nn.Linear(in_channels, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_tanh = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Tanh())
        self.attention_gate = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Sigmoid())
        self.attention_score = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.instance_classifier = nn.Linear(embed_dim, 2 * num_classes) if instance_classifier else None

    def attend(self, feature_map: Tensor) -> MILOutput:
        """Bag logits, the attention map and (optionally) instance logits of a feature map."""
        instances = self.embed(feature_map.flatten(2).transpose(1, 2))  # [B, N, embed]
        scores = self.attention_score(self.attention_tanh(instances) * self.attention_gate(instances))
        attention = scores.squeeze(-1).softmax(-1)  # [B, N]
        bag = torch.einsum("bn,bne->be", attention, instances)
        instance_logits = None
        if self.instance_classifier is not None:
            instance_logits = self.instance_classifier(instances).unflatten(-1, (self.num_classes, 2))
        return MILOutput(self.classifier(bag), attention.unflatten(1, feature_map.shape[2:]), instance_logits)

    def forward(self, feature_map: Tensor) -> Tensor:
        """Bag logits ``[B, classes]``."""
        return self.attend(feature_map).logits

    @staticmethod
    def instance_loss(output: MILOutput, target: Tensor, k: int) -> Tensor:
        """CLAM's in-class instance loss: for each bag, the classifier of its class learns to call
        its ``k`` most attended instances "in class" and its ``k`` least attended "not"."""
        if output.instance_logits is None:
            raise ValueError("instance_loss needs a head built with instance_classifier=True")
        attention = output.attention.flatten(1)
        k = min(k, attention.shape[1] // 2)
        if k < 1:
            raise ValueError(f"the feature map has {attention.shape[1]} cell(s); the instance loss needs at least 2")
        order = attention.argsort(dim=1, descending=True)
        chosen = torch.cat([order[:, :k], order[:, -k:]], dim=1)  # [B, 2k]
        pseudo = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(target.device).expand_as(chosen)
        rows = torch.arange(len(target), device=target.device)[:, None]
        logits = output.instance_logits[rows, chosen, target[:, None]]  # [B, 2k, 2]
        return nn.functional.cross_entropy(logits.flatten(0, 1), pseudo.flatten())


class AttentionMIL(ImageClassifier):
    """Streamed trunk, then a :class:`GatedAttentionMIL` head: a slide classifier that shows where it looked.

    Trains, validates and logs like :class:`~lightstream.modules.ImageClassifier` (the bag loss is
    ``loss_fn``); with ``instance_classifier=True`` the training loss is
    ``(1 - w) * bag loss + w * instance loss`` with ``w = instance_loss_weight`` (logged as
    ``train_instance_loss``). :meth:`predict_step` returns a :class:`SlideOutput` whose heatmap
    is the attention map; :attr:`last_output` holds the head's output of the latest forward.

    Args:
        stream_network: the trunk (streamed).
        tile_size: tile height and width in image pixels.
        feature_channels: channels of the trunk's feature map.
        num_classes, embed_dim, attention_dim, dropout, instance_classifier: of the head.
        instance_k: instances per bag taken as pseudo-positives and as pseudo-negatives.
        instance_loss_weight: ``w`` above.
        loss_fn, train_streaming_layers, metrics, lr, **kwargs: as in ImageClassifier.
    """

    def __init__(
        self,
        stream_network: nn.Module,
        tile_size: int | tuple[int, int],
        feature_channels: int,
        num_classes: int = 2,
        loss_fn: nn.Module | None = None,
        train_streaming_layers: bool = True,
        metrics: MetricsArg = None,
        *,
        embed_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.0,
        instance_classifier: bool = False,
        instance_k: int = 8,
        instance_loss_weight: float = 0.3,
        lr: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        head = GatedAttentionMIL(feature_channels, num_classes, embed_dim, attention_dim, dropout,
                                 instance_classifier)
        super().__init__(stream_network, head, tile_size, loss_fn, train_streaming_layers, metrics, lr=lr, **kwargs)
        self.instance_k = instance_k
        self.instance_loss_weight = instance_loss_weight
        self.last_output: MILOutput | None = None

    def forward_head(self, feature_map: Tensor) -> Tensor:
        """Bag logits; the attention map and instance logits are kept in :attr:`last_output`."""
        self.last_output = self.head.attend(feature_map)
        return self.last_output.logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Bag loss, plus the weighted instance loss when the head has an instance classifier."""
        loss = super().training_step(batch, batch_idx)
        if self.head.instance_classifier is None:
            return loss
        target = _image_and_target(batch)[1]
        instance = self.head.instance_loss(self.last_output, target, self.instance_k)
        self.log("train_instance_loss", instance, batch_size=int(target.shape[0]))
        return (1 - self.instance_loss_weight) * loss + self.instance_loss_weight * instance

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> SlideOutput:
        """Bag logits and attention map of a batch (``image``, ``(image, ...)`` or a slide sample)."""
        image = _image_and_target(batch)[0]
        output = self.head.attend(self.forward_streaming(image))
        return SlideOutput(output.logits, output.attention, "attention", self.stream_network.output_stride)
