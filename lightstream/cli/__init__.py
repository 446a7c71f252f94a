"""The ``lightstream`` console command (``python -m lightstream``): train and predict on a folder of slides.

    lightstream fit --print_config > config.yaml        # every option, with its default
    lightstream fit --config config.yaml                 # data.table: your CSV of path,label
    lightstream predict --config config.yaml --ckpt_path checkpoints/last.ckpt

Built on :class:`lightning.pytorch.cli.LightningCLI`: the subcommands are ``fit``,
``validate``, ``test`` and ``predict``; ``--model`` picks the model class
(:class:`~lightstream.models.SlideAttentionMIL` by default, or
:class:`~lightstream.models.SlideClassifier`), ``--data`` configures the
:class:`~lightstream.data.datamodule.SlideDataModule`.
"""

from .app import LightstreamCLI, main
from .writer import SlidePredictionWriter

__all__ = ["LightstreamCLI", "SlidePredictionWriter", "main"]
