"""Slide-level models by backbone name, with every option an explicit argument (what the CLI configures).

:class:`SlideClassifier` pools the streamed feature map globally; :class:`SlideAttentionMIL`
weighs its cells by gated attention. Both take ``uint8`` RGB slides (the backbone's
normalisation is built in), log ``{stage}_loss`` and, for validation and test, ``{stage}_auc`` and
``{stage}_acc`` (a training step sees one slide, whose AUC means nothing), and
predict a :class:`~lightstream.modules.SlideOutput` with a heatmap for every slide.
"""

from __future__ import annotations

from typing import Any, Literal

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

from ..modules import AttentionMIL, ImageClassifier, PooledLinearHead, SlideOutput
from .backbone import Backbone, build_backbone

__all__ = ["SlideAttentionMIL", "SlideClassifier"]

Stages = Literal["auto"] | list[int] | None


def _slide_metrics(num_classes: int) -> MetricCollection:
    """AUC (one-vs-rest, macro: for two classes the binary AUC) and accuracy."""
    return MetricCollection({"auc": MulticlassAUROC(num_classes), "acc": MulticlassAccuracy(num_classes, average="micro")})


def _engine_options(backbone: Backbone, stages: Stages, stage_memory: int | None, tile_cache_dir: str | None,
                    progress: bool) -> dict[str, Any]:
    return {"mean": backbone.mean, "std": backbone.std, "stages": stages,
            "stage_memory": "auto" if stage_memory is None else stage_memory,
            "tile_cache_dir": tile_cache_dir, "progress": progress}


class SlideClassifier(ImageClassifier):
    """A streamed backbone, global max/average pooling and a linear layer: one label per slide.

    Args:
        backbone: a name from :data:`~lightstream.models.BACKBONE_NAMES` (``resnet18``,
            ``resnet34``, ``resnet50``, ``convnext_tiny``, ``mobilenet_v2``, ``small_cnn``...).
        num_classes: slide classes.
        tile_size: tile side in pixels (at least the backbone's receptive field).
        weights: torchvision weights name (``"DEFAULT"``) or ``None`` for random initialisation.
        pooling: ``"max"`` or ``"avg"`` over the feature map.
        lr: learning rate of Adam.
        train_streaming_layers: train the backbone (``False``: only the head).
        stages: ``"auto"``, child indices to cut the trunk after, or ``None`` (see StreamingCNN).
        stage_memory: bytes the kept stage maps may use; ``None`` picks it from the device.
        tile_cache_dir: folder for the tile cache file, or ``None``.
        progress: a progress bar over the tiles of every slide.

    :meth:`predict_step` returns a :class:`~lightstream.modules.SlideOutput` whose heatmap is
    the predicted class's logit at every feature-map cell (a class activation map).
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 2, tile_size: int = 1024,
                 weights: str | None = None, pooling: Literal["max", "avg"] = "max", lr: float = 1e-4,
                 train_streaming_layers: bool = True, stages: Stages = "auto", stage_memory: int | None = None,
                 tile_cache_dir: str | None = None, progress: bool = False) -> None:
        built = build_backbone(backbone, weights)
        super().__init__(built.trunk, PooledLinearHead(built.channels, num_classes, pooling), tile_size, None,
                         train_streaming_layers, _slide_metrics(num_classes), lr=lr, predict_feature_map=True,
                         **_engine_options(built, stages, stage_memory, tile_cache_dir, progress))
        self.train_metrics = None

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> SlideOutput:
        """Logits and the predicted class's score map of a batch."""
        logits, feature_map = super().predict_step(batch, batch_idx, dataloader_idx)
        scores = self.head.score_map(feature_map)
        chosen = logits.argmax(1)[:, None, None, None].expand(-1, 1, *scores.shape[2:])
        return SlideOutput(logits, scores.gather(1, chosen)[:, 0], "class score", self.stream_network.output_stride)


class SlideAttentionMIL(AttentionMIL):
    """A streamed backbone with a gated-attention MIL head (:class:`~lightstream.modules.AttentionMIL`).

    Args:
        backbone, num_classes, tile_size, weights, lr, train_streaming_layers, stages, stage_memory, tile_cache_dir, progress:
            as in :class:`SlideClassifier`.
        embed_dim, attention_dim, dropout, instance_classifier, instance_k, instance_loss_weight:
            of the MIL head and its instance loss (see :class:`~lightstream.modules.AttentionMIL`).

    :meth:`predict_step` returns the attention map as the heatmap.
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 2, tile_size: int = 1024,
                 weights: str | None = None, embed_dim: int = 256, attention_dim: int = 128, dropout: float = 0.0,
                 instance_classifier: bool = False, instance_k: int = 8, instance_loss_weight: float = 0.3,
                 lr: float = 1e-4, train_streaming_layers: bool = True, stages: Stages = "auto",
                 stage_memory: int | None = None, tile_cache_dir: str | None = None, progress: bool = False) -> None:
        built = build_backbone(backbone, weights)
        super().__init__(built.trunk, tile_size, built.channels, num_classes, None, train_streaming_layers,
                         _slide_metrics(num_classes), embed_dim=embed_dim, attention_dim=attention_dim,
                         dropout=dropout, instance_classifier=instance_classifier, instance_k=instance_k,
                         instance_loss_weight=instance_loss_weight, lr=lr,
                         **_engine_options(built, stages, stage_memory, tile_cache_dir, progress))
        self.train_metrics = None
