"""Prediction outputs of ``lightstream predict``: a CSV of per-slide scores and a heatmap PNG per slide."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lightstream.data.dataset import SlideSample
from lightstream.data.heatmap import slide_heatmap
from lightstream.modules.heads import SlideOutput
from lightstream.viz.heatmap import plot_heatmap_overlay

__all__ = ["SlidePredictionWriter"]

logger = logging.getLogger(__name__)


class SlidePredictionWriter(BasePredictionWriter):
    """Writes ``scores.csv`` (one row per slide) and ``<slide>_<kind>.png`` heatmaps into ``output_dir``.

    The CSV has the columns ``slide`` (its path), ``label`` (from the table), ``predicted``
    (the class with the highest score), ``score_<class>`` (softmax of the logits; ``<class>``
    is the data module's class name or index) and ``heatmap`` (the PNG's file name). The
    heatmap is the model's :class:`~lightstream.modules.SlideOutput` map (attention, class
    score...) drawn over the slide's thumbnail. It needs slide batches (``SlideDataModule``).

    Args:
        output_dir: folder for the outputs (created).
        heatmaps: write the PNGs (``False``: the CSV only).
        thumbnail_size: longer side of the thumbnail under each heatmap, in pixels.
    """

    def __init__(self, output_dir: str = "predictions", heatmaps: bool = True, thumbnail_size: int = 1024) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.heatmaps = heatmaps
        self.thumbnail_size = thumbnail_size
        self._rows: list[dict[str, Any]] = []
        self._names: set[str] = set()

    @property
    def scores_path(self) -> Path:
        """Where the scores CSV goes."""
        return self.output_dir / "scores.csv"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._rows, self._names = [], set()

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(batch, SlideSample):
            raise TypeError(f"SlidePredictionWriter needs one slide per batch (a SlideSample, as SlideDataModule "
                            f"yields), got {type(batch).__name__}")
        logits = prediction.logits if isinstance(prediction, SlideOutput) else prediction
        if not isinstance(logits, Tensor):
            raise TypeError(f"predict_step must return logits or a SlideOutput, got {type(prediction).__name__}")
        scores = logits.detach().float().softmax(-1)[0].cpu()
        names = _class_names(trainer, len(scores))
        row: dict[str, Any] = {"slide": str(batch.slide.path), "label": _label_name(batch.label, names),
                               "predicted": names[int(scores.argmax())]}
        row.update({f"score_{name}": f"{float(score):.6f}" for name, score in zip(names, scores)})
        row["heatmap"] = ""
        if self.heatmaps and isinstance(prediction, SlideOutput):
            row["heatmap"] = self._write_heatmap(prediction, batch, names[int(scores.argmax())])
        self._rows.append(row)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.scores_path if trainer.world_size == 1 else self.output_dir / f"scores_rank{trainer.global_rank}.csv"
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(self._rows[0]) if self._rows else ["slide"])
            writer.writeheader()
            writer.writerows(self._rows)
        logger.info("wrote scores of %d slide(s) to %s", len(self._rows), path)

    def _write_heatmap(self, prediction: SlideOutput, batch: SlideSample, predicted: str) -> str:
        rows, cols = prediction.output_stride
        if rows != cols:
            raise ValueError(f"heatmaps need a square output stride, got {prediction.output_stride}")
        thumbnail, heatmap = slide_heatmap(prediction.heatmap[0].detach().float().cpu(), batch.slide, rows,
                                           batch.box, self.thumbnail_size)
        stem = batch.slide.path.stem
        name = f"{stem}_{prediction.heatmap_kind.replace(' ', '_')}.png"
        index = 1
        while name in self._names:  # two slides with the same file name in different folders
            index += 1
            name = f"{stem}-{index}_{prediction.heatmap_kind.replace(' ', '_')}.png"
        self._names.add(name)
        title = f"{stem}: {prediction.heatmap_kind} (predicted {predicted})"
        plot_heatmap_overlay(thumbnail, heatmap, title=title).savefig(self.output_dir / name, dpi=100)
        return name


def _class_names(trainer: L.Trainer, count: int) -> list[str]:
    classes = getattr(trainer.datamodule, "classes", None)
    return list(classes) if classes is not None and len(classes) == count else [str(i) for i in range(count)]


def _label_name(label: Tensor, names: list[str]) -> str:
    value = label.item()
    return names[int(value)] if float(value).is_integer() and 0 <= value < len(names) else str(value)
