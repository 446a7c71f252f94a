"""StreamingModule: a LightningModule whose convolutional trunk is streamed tile by tile, exactly.

The trunk runs through :class:`~lightstream.core.StreamingCNN`; everything after it (the head,
the loss, the optimiser, precision, devices, DDP, gradient accumulation and clipping) is plain
Lightning.

How gradients reach the trunk
-----------------------------
*The common case needs no custom backward.* When gradients are recorded,
:meth:`StreamingModule.forward_streaming` returns the stitched feature map *attached* to
autograd (:meth:`StreamingCNN.forward_autograd`): ``loss.backward()`` (which Lightning calls)
runs the head's backward and then the streamed backward, and the trunk's gradients arrive
through autograd like any other module's. DDP's gradient hooks, ``accumulate_grad_batches``,
gradient clipping and the precision plugin's loss scaling therefore apply to the trunk too.

*The reference's manual style still works.* A subclass that overrides :meth:`~StreamingModule.backward` (or
calls :meth:`~StreamingModule.forward_streaming` under ``torch.no_grad()``, e.g. with manual optimisation) gets a
*detached* feature map, as the paper's API returns, and must hand its gradient back::

    def training_step(self, batch, batch_idx):
        self.image, target = batch
        self.fmap = self.forward_streaming(self.image)
        self.fmap.requires_grad = self.training
        return self.loss_fn(self.head(self.fmap), target)

    def backward(self, loss):
        loss.backward()
        self.backward_streaming(self.image, self.fmap.grad)

:meth:`~StreamingModule.backward_streaming` does not run the forward again: the module keeps the autograd graph
of the last detached forward (one image) and backpropagates ``gradient`` through it, so this
path is also exact, also replays the forward's autocast state, and also reaches DDP's hooks.
Calling it after an attached forward raises (it would count the trunk's gradient twice).

Normalisation layers
--------------------
BatchNorm in training mode normalises with statistics of the whole image, which tiles cannot
reproduce, so the trunk's BatchNorm layers always stay in eval mode (running statistics; their
affine weights still train). :meth:`StreamingModule.train` re-freezes them after every
``.train()`` call, and :meth:`~StreamingModule.on_train_epoch_start` does it again in case user code switched
modes directly. Lightning warns at fit start that some modules are in eval mode: those are
the trunk's BatchNorm layers, frozen on purpose.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Self

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from ..core import ImageSource, StreamingCNN, StreamingError, as_source
from ..core.graph import parameter_dtype
from .checkpoint import check_trunk_geometry, record_trunk_geometry
from .tile_cache import TileCache, interior_tile_stride, warn_on_rank_zero

__all__ = ["StreamingModule"]

logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
"""Trainer precisions whose plugin runs steps under autocast, and the autocast dtype."""


def _freeze_batch_norm(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def _check_module_arguments(stream_network: Any, train_streaming_layers: Any, tile_cache_fname: Any) -> None:
    """Refuse constructor arguments of the wrong kind before anything is built from them."""
    if not isinstance(stream_network, nn.Module):
        raise TypeError(f"stream_network must be an nn.Module (the trunk to stream), got "
                        f"{type(stream_network).__name__} {stream_network!r:.60}")
    if not isinstance(train_streaming_layers, bool):
        raise TypeError(f"train_streaming_layers must be True or False, got {train_streaming_layers!r}")
    if tile_cache_fname is not None and (not isinstance(tile_cache_fname, str) or tile_cache_fname in ("", "..")
                                         or Path(tile_cache_fname).name != tile_cache_fname):
        raise ValueError(f"tile_cache_fname must be a file name inside tile_cache_dir (no folders), "
                         f"got {tile_cache_fname!r}")


class StreamingModule(L.LightningModule):
    """A LightningModule with a streamed convolutional trunk.

    Args:
        stream_network: the trunk, an ``nn.Module`` of local operations (see
            :class:`~lightstream.core.StreamingCNN`). Its BatchNorm layers are put in eval mode.
        tile_size: tile height and width in image pixels (an int or ``(height, width)``).
        train_streaming_layers: train the trunk; ``False`` freezes its parameters
            (``requires_grad=False``) so no streamed backward runs at all.
        **kwargs: ``tile_cache_dir`` (a directory; ``None``, the default, writes no cache file),
            ``tile_cache_fname`` (file name; default derived from the cache key); everything
            else goes to :class:`~lightstream.core.StreamingCNN` (``mean``, ``std``,
            ``saliency``, ``progress``, ``stages``, ``stage_memory``).

    Subclasses implement ``training_step`` (and the other steps) with
    :meth:`forward_streaming`; see the module docstring for how gradients reach the trunk.
    Hooks defined here call ``super()``; overrides of them must call ``super()`` as well.
    """

    def __init__(
        self,
        stream_network: nn.Module,
        tile_size: int | tuple[int, int],
        train_streaming_layers: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_module_arguments(stream_network, train_streaming_layers, kwargs.get("tile_cache_fname"))
        self.train_streaming_layers = train_streaming_layers
        cache_dir = kwargs.pop("tile_cache_dir", None)
        self.tile_cache_dir: Path | None = None if cache_dir is None else Path(cache_dir)
        self.tile_cache_fname: str | None = kwargs.pop("tile_cache_fname", None)
        if self.tile_cache_dir is not None and not self.tile_cache_dir.is_dir():
            raise NotADirectoryError(f"tile_cache_dir {str(self.tile_cache_dir)!r} is not an existing directory")
        if not train_streaming_layers:
            stream_network.requires_grad_(False)
            logger.info("train_streaming_layers=False: the streamed trunk's parameters are frozen")
        _freeze_batch_norm(stream_network)  # before the engine traces the trunk
        self.stream_network = StreamingCNN(stream_network, tile_size=tile_size, **kwargs)
        self._streaming_hooks_enabled = True
        self._awaiting_backward: tuple[Tensor | ImageSource, Tensor] | None = None
        self._sync_tile_cache()

    # ------------------------------------------------------------------ configuration
    @property
    def tile_size(self) -> tuple[int, int]:
        """Tile ``(height, width)`` in image pixels: the engine's :attr:`StreamingCNN.tile_size`.

        Setting it sets the engine's (one meaning everywhere: the engine, this module and the
        tile tuner re-plan the same way): a tile smaller than the receptive field raises
        :class:`~lightstream.TileTooSmallError` and changes nothing; the tile cache is re-checked.
        """
        return self.stream_network.tile_size

    @tile_size.setter
    def tile_size(self, new_tile_size: int | tuple[int, int]) -> None:
        old = self.stream_network.tile_size
        self.stream_network.tile_size = new_tile_size
        logger.info("tile size changed from %s to %s", old, self.stream_network.tile_size)
        self._sync_tile_cache()

    @property
    def streaming_dtype(self) -> torch.dtype:
        """The dtype the trunk computes in: the autocast dtype under a ``*-mixed`` Trainer
        precision, otherwise the dtype of its parameters (which ``*-true`` precisions set)."""
        precision = self._trainer.precision if self._trainer is not None else None
        return _AUTOCAST_DTYPES.get(precision, parameter_dtype(self.stream_network.stream_module))

    def configure_tile_stride(self) -> tuple[int, int]:
        """Image pixels between the starts of neighbouring interior tiles, ``(height, width)``.

        The engine is exact for any image size; a data pipeline can still crop or pad images
        to ``k * stride + (tile_size - stride)`` pixels so no tile is cut short.
        """
        return interior_tile_stride(self.stream_network)

    def get_trainable_params(self) -> list[nn.Parameter]:
        """All parameters of the model (trunk and head) that require gradients."""
        return [param for param in self.parameters() if param.requires_grad]

    def freeze_streaming_normalization_layers(self) -> None:
        """Put every BatchNorm layer of the trunk in eval mode (running statistics).

        BatchNorm in training mode normalises with statistics of the whole image, which a tile
        cannot reproduce; in eval mode it is a per-channel affine map and streams exactly.
        """
        _freeze_batch_norm(self.stream_network.stream_module)

    def train(self, mode: bool = True) -> Self:
        """Set training mode like ``nn.Module.train``, keeping the trunk's BatchNorm in eval mode."""
        super().train(mode)
        self.freeze_streaming_normalization_layers()
        return self

    def disable_streaming_hooks(self) -> None:
        """Run the trunk conventionally on the whole image from now on (no tiles).

        Useful as a reference and for images small enough to fit: :meth:`forward_streaming`
        then calls the trunk on the whole (normalised) image, with ordinary autograd.
        """
        self._streaming_hooks_enabled = False

    def enable_streaming_hooks(self) -> None:
        """Stream the trunk tile by tile again (the default)."""
        self._streaming_hooks_enabled = True

    # ------------------------------------------------------------------ forward and backward
    def forward_streaming(self, x: Tensor | ImageSource) -> Tensor:
        """Run the trunk over ``x`` (``[B, C, H, W]`` tensor or lazy image source).

        Returns the stitched feature map. It is attached to autograd when gradients are being
        recorded, so ``loss.backward()`` streams the trunk's backward too. It is detached (and
        :meth:`backward_streaming` must follow) when this is called under ``torch.no_grad()`` in
        training mode, or when the class overrides :meth:`backward` (the manual style). Nothing
        is kept when the trunk needs no gradient (frozen trunk, evaluation under no_grad).
        """
        self._warn_if_backward_pending()
        if not self._trunk_needs_gradients(x) or not (torch.is_grad_enabled() or self.training):
            with torch.no_grad():
                return self._run_trunk(x)
        if torch.is_grad_enabled() and not is_overridden("backward", self, parent=StreamingModule):
            return self._run_trunk(self._track_saliency(x))
        with torch.enable_grad():
            fmap = self._run_trunk(self._track_saliency(x))
        self._awaiting_backward = (x, fmap)
        return fmap.detach()

    def backward_streaming(self, image: Tensor | ImageSource, gradient: Tensor | None) -> None:
        """Backpropagate ``gradient`` (of the feature map) through the trunk: the manual style.

        ``image`` must be the object last given to :meth:`forward_streaming`, which returned
        a detached feature map and kept its autograd graph: the streamed backward runs from
        that graph (no second forward, the forward's autocast state replayed), and the trunk's
        gradients arrive through autograd, so DDP and gradient accumulation see them. Does
        nothing when the trunk needs no gradient.

        Raises:
            StreamingError: when no detached forward of ``image`` awaits its backward (e.g. the
                forward was attached, so ``loss.backward()`` already streamed the trunk).
            ValueError: when ``gradient`` is ``None`` (the feature map did not require grad).
        """
        pending = self._awaiting_backward
        if pending is None:
            if not self._trunk_needs_gradients(image):
                return
            raise StreamingError(
                "backward_streaming: no detached feature map awaits a backward. forward_streaming "
                "returns a map attached to autograd when gradients are recorded and backward() is "
                "not overridden; then loss.backward() already streamed the trunk's backward, and "
                "calling backward_streaming would count it twice. Remove the call, or override "
                "backward() / run forward_streaming under torch.no_grad() for the manual style.")
        if pending[0] is not image:
            raise StreamingError("backward_streaming: pass the same image object that was given to the "
                                 "last forward_streaming call (one image at a time: forward, then backward)")
        if gradient is None:
            raise ValueError("backward_streaming: gradient is None; call fmap.requires_grad_() on the "
                             "feature map before computing the loss, then pass fmap.grad")
        self._awaiting_backward = None
        torch.autograd.backward(pending[1], gradient)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backpropagate the training loss; with an attached feature map this streams the trunk too.

        Override it only for the manual style (then :meth:`forward_streaming` returns detached
        feature maps and the override must call :meth:`backward_streaming`).
        """
        super().backward(loss, *args, **kwargs)

    def _trunk_needs_gradients(self, x: Tensor | ImageSource) -> bool:
        if self.stream_network.saliency or (isinstance(x, Tensor) and x.requires_grad):
            return True
        return any(param.requires_grad for param in self.stream_network.stream_module.parameters())

    def _track_saliency(self, x: Tensor | ImageSource) -> Tensor | ImageSource:
        """With ``saliency=True``, store the image gradient in ``stream_network.saliency_map``."""
        if not self.stream_network.saliency:
            return x
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError("saliency=True needs the image as a floating-point tensor (its gradient "
                             "is taken with respect to it)")
        leaf = x if x.requires_grad else x.detach().requires_grad_()
        leaf.register_hook(self._store_saliency)
        return leaf

    def _store_saliency(self, gradient: Tensor) -> None:
        self.stream_network.saliency_map = gradient

    def _run_trunk(self, x: Tensor | ImageSource) -> Tensor:
        engine = self.stream_network
        if not self._streaming_hooks_enabled:
            return engine.stream_module(self._whole_image(x))
        return engine.forward_autograd(x) if torch.is_grad_enabled() else engine(x)

    def _whole_image(self, x: Tensor | ImageSource) -> Tensor:
        """The image on the trunk's device, cast and normalised as the engine does per tile."""
        if not isinstance(x, Tensor):
            source = as_source(x)
            x = source.read(slice(0, source.shape[2]), slice(0, source.shape[3]))
        return self.stream_network.prepare_input(x)

    def _warn_if_backward_pending(self) -> None:
        if self._awaiting_backward is not None:
            rank_zero_warn("forward_streaming: the previous detached feature map never went through "
                           "backward_streaming, so the trunk got no gradient from it; discarding it")
            self._awaiting_backward = None

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_start_for_streaming(self) -> None:
        """Ready the engine for a run: device, normalisation modes, precision and tile cache.

        The normalisation buffers follow the module's device; the streamed forward runs under
        the precision plugin's autocast (the engine records it and the backward's recomputation
        replays it), so only the trunk's dtype has to be known here, for the log and the cache.
        """
        self.stream_network.to(self.device)
        self.freeze_streaming_normalization_layers()
        logger.info("streaming the trunk in %s on %s with %sx%s px tiles", self.streaming_dtype,
                    self.device, *self.tile_size)
        self._sync_tile_cache()

    def on_train_start(self) -> None:
        """Ready streaming for training (call ``super().on_train_start()`` in overrides)."""
        super().on_train_start()
        self.prepare_start_for_streaming()

    def on_train_epoch_start(self) -> None:
        """Re-freeze the trunk's BatchNorm (call ``super().on_train_epoch_start()`` in overrides)."""
        super().on_train_epoch_start()
        self.freeze_streaming_normalization_layers()

    def on_validation_start(self) -> None:
        """Ready streaming for validation (call ``super().on_validation_start()`` in overrides)."""
        super().on_validation_start()
        self.prepare_start_for_streaming()

    def on_test_start(self) -> None:
        """Ready streaming for testing (call ``super().on_test_start()`` in overrides)."""
        super().on_test_start()
        self.prepare_start_for_streaming()

    def on_predict_start(self) -> None:
        """Ready streaming for prediction (call ``super().on_predict_start()`` in overrides)."""
        super().on_predict_start()
        self.prepare_start_for_streaming()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the trunk's geometry in the checkpoint (call ``super()`` in overrides)."""
        super().on_save_checkpoint(checkpoint)
        record_trunk_geometry(checkpoint, self.stream_network)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of a trunk with another geometry (call ``super()`` in overrides).

        Raises:
            TrunkGeometryError: the checkpoint's trunk had another output stride, receptive
                field, dilation or wiring than this one (see :mod:`lightstream.modules.checkpoint`).
        """
        super().on_load_checkpoint(checkpoint)
        check_trunk_geometry(checkpoint, self.stream_network)

    # ------------------------------------------------------------------ tile cache
    @property
    def tile_cache_path(self) -> Path | None:
        """Where the tile cache lives; ``None`` when ``tile_cache_dir`` was not given."""
        if self.tile_cache_dir is None:
            return None
        name = self.tile_cache_fname or f"tile_cache_{self._tile_cache_record().key}.json"
        return self.tile_cache_dir / name

    def _tile_cache_record(self) -> TileCache:
        return TileCache.of(self.stream_network, self.streaming_dtype)

    def load_tile_cache_if_needed(self, use_tile_cache: bool = True) -> TileCache | None:
        """Read the tile cache and check it against the trunk, tile size and dtype.

        Returns the record when it matches; ``None`` when there is no file, caching is off, or
        the file is stale or unreadable (logged as a warning).
        """
        path = self.tile_cache_path
        if not use_tile_cache or path is None or not path.exists():
            return None
        stored = TileCache.read(path)
        if stored is None:
            return None
        current = self._tile_cache_record()
        if stored != current:
            warn_on_rank_zero("tile cache %s is stale (%s differ from this trunk); rebuilding it",
                              path, ", ".join(stored.differences(current)))
            return None
        logger.debug("tile cache %s matches this trunk", path)
        return stored

    def save_tile_cache_if_needed(self, overwrite: bool = False) -> Path | None:
        """Write the tile cache (global rank 0 only); returns the path written, if any."""
        path = self.tile_cache_path
        if path is None or rank_zero_only.rank != 0:
            return None
        if path.exists() and not overwrite:
            logger.debug("tile cache %s exists and overwrite is False; not writing it", path)
            return None
        self._tile_cache_record().write(path)
        logger.info("wrote tile cache %s", path)
        return path

    def _sync_tile_cache(self) -> None:
        if self.tile_cache_dir is not None and self.load_tile_cache_if_needed() is None:
            self.save_tile_cache_if_needed(overwrite=True)
