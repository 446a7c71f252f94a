"""The ``lightstream`` command: Lightning's CLI over the slide models and :class:`SlideDataModule`."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightstream.data.datamodule import SlideDataModule
from lightstream.models import SlideAttentionMIL
from lightstream.modules import StreamingModule

from .writer import SlidePredictionWriter

__all__ = ["LightstreamCLI", "main"]


class LightstreamCLI(LightningCLI):
    """``LightningCLI`` with a slide table as data, a checkpoint and a prediction writer.

    Adds the groups ``checkpoint`` (a :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
    keeping ``last.ckpt`` and the best by ``val_auc`` in ``checkpoints/``) and ``predictions``
    (a :class:`SlidePredictionWriter`, active in ``predict``), and links the model's
    ``num_classes`` to the data's.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.dirpath": "checkpoints", "checkpoint.monitor": "val_auc",
                             "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(SlidePredictionWriter, "predictions")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.set_defaults({"model": {"class_path": f"{SlideAttentionMIL.__module__}.{SlideAttentionMIL.__name__}"}})


def main(args: list[str] | None = None) -> LightstreamCLI:
    """Run ``lightstream fit | validate | test | predict`` with ``args`` (default: the command line)."""
    return LightstreamCLI(
        StreamingModule,
        SlideDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        trainer_defaults={"log_every_n_steps": 1},
        save_config_kwargs={"overwrite": True},
        args=args,
    )
