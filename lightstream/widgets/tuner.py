"""An interactive tile-size tuner: a slider over :class:`~lightstream.widgets.model.TileTunerModel`."""

from __future__ import annotations

import html
import io
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure
from torch import nn

from lightstream.viz import format_bytes, plot_receptive_profile, plot_tile_grid

from .model import StepMeasurement, TileTunerModel

__all__ = ["TileTuner"]

logger = logging.getLogger(__name__)

_RED = "#b00020"


class TileTuner:
    """Pick a tile size by looking: tile grid, layer profile and step estimate follow a slider.

    Shows the number of tiles, the recompute factor, the estimated peak memory and relative
    step time of the chosen tile size, or a warning naming the smallest valid tile. A button
    measures one real forward and backward step (in a background thread, so the slider stays
    live). All state lives in :attr:`model` (a :class:`TileTunerModel`); this class only draws it.

    Args:
        model_or_trunk, image, tile_sizes, tile_size: see :class:`TileTunerModel`.
        figsize: size (inches) of the tile-grid figure; the profile figure is as tall and
            ``profile_width`` wide. Both are shown as PNGs of ``dpi`` dots per inch; the profile
            is rendered again only when it changes (it rarely depends on the tile size).

    Example::

        tuner = TileTuner(trunk, image)   # the last expression of a cell shows the widget
        ...
        model = StreamingCNN(trunk, tile_size=tuner.tile_size)
    """

    def __init__(
        self,
        model_or_trunk: nn.Module,
        image: Any,
        tile_sizes: Sequence[int] | None = None,
        *,
        tile_size: int | None = None,
        figsize: tuple[float, float] = (5.5, 5.5),
        profile_width: float = 8.5,
        dpi: int = 72,
    ) -> None:
        self.model = TileTunerModel(model_or_trunk, image, tile_sizes, tile_size=tile_size,
                                    thumbnail_size=2 * round(max(figsize) * dpi))
        self.grid_figure = Figure(figsize=figsize, layout="constrained")
        self.profile_figure = Figure(figsize=(profile_width, figsize[1]), layout="constrained")
        self.dpi = dpi
        self._drawn_profiles: list | None = None
        self.last_redraw_seconds = 0.0
        """Wall time of the last redraw (plan, estimate, both plots and the PNG)."""
        self._measuring: threading.Thread | None = None

        self.slider = widgets.SelectionSlider(
            options=self.model.tile_sizes, value=self.model.tile_size, description="tile size (px)",
            continuous_update=False, style={"description_width": "initial"},
            layout=widgets.Layout(width="min(640px, 70%)"))
        self.measure_button = widgets.Button(
            description="measure one step", icon="stopwatch",
            tooltip="run one real forward + backward of the streamed trunk at this tile size",
            layout=widgets.Layout(width="auto"))
        self.warning = widgets.HTML()
        self.stats = widgets.HTML()
        self.measurement = widgets.HTML()
        self.grid_image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.profile_image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        names = ("slider", "measure_button", "warning", "stats", "measurement", "grid_image", "profile_image")
        for name in names:
            getattr(self, name).add_class(f"lightstream-tuner-{name.replace('_', '-')}")
        self.widget = widgets.VBox([
            widgets.HBox([self.slider, self.measure_button]), self.warning, self.stats, self.measurement,
            widgets.Box([self.grid_image, self.profile_image], layout=widgets.Layout(flex_flow="row wrap")),
        ])
        self.widget.add_class("lightstream-tuner")
        self.slider.observe(self._on_slide, names="value")
        self.measure_button.on_click(lambda _button: self.measure_step())
        self.redraw()

    @property
    def tile_size(self) -> int:
        """The chosen tile side in pixels (setting it moves the slider)."""
        return self.model.tile_size

    @tile_size.setter
    def tile_size(self, value: int) -> None:
        if value not in self.model.tile_sizes:
            raise ValueError(f"{value} is not one of the slider's tile sizes {self.model.tile_sizes}")
        self.slider.value = value

    def apply(self) -> None:
        """Set the chosen tile size on the ``StreamingCNN`` the tuner was given."""
        self.model.apply()

    def _on_slide(self, change: dict[str, Any]) -> None:
        self.model.tile_size = change["new"]
        self.redraw()

    def redraw(self) -> None:
        """Render the model's current state into the widgets (figures first, then the text)."""
        start = time.perf_counter()
        model = self.model
        self.grid_figure.clear()
        grid_ax = self.grid_figure.add_subplot()
        if model.plan is not None:
            plot_tile_grid(model.plan, model.thumbnail, ax=grid_ax)
        else:
            grid_ax.set_axis_off()
            grid_ax.text(0.5, 0.5, f"no tiling at {model.tile_size} px:\ntile smaller than\n"
                         f"the minimum of {model.minimum_tile_size} px", ha="center", va="center",
                         color=_RED, transform=grid_ax.transAxes)
        self.grid_image.value = self._png(self.grid_figure)
        if model.profiles != self._drawn_profiles:
            self.profile_figure.clear()
            plot_receptive_profile(model.profiles, ax=self.profile_figure.add_subplot())
            self.profile_image.value = self._png(self.profile_figure)
            self._drawn_profiles = model.profiles
        self.warning.value = _red(f"⚠ {model.warning}", bold=True) if model.warning else ""
        self.stats.value = self._stats_html()
        self.measure_button.disabled = model.plan is None or self._measuring is not None
        self.last_redraw_seconds = time.perf_counter() - start
        logger.debug("redrew the tuner at %d px in %.3f s", model.tile_size, self.last_redraw_seconds)

    def _png(self, figure: Figure) -> bytes:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=self.dpi)
        return buffer.getvalue()

    def _stats_html(self) -> str:
        model = self.model
        plan, estimate = model.plan, model.estimate
        if plan is None or estimate is None:
            tiles = "—"
            rows: list[tuple[str, str]] = []
        else:
            tiles = f"{len(plan)} ({plan.grid[0]} × {plan.grid[1]})"
            rows = [
                ("pixels read (overlap)", f"× {plan.recompute_factor:.2f} the image"),
                ("compute per pass (recompute factor)",
                 f"× {estimate.recompute_factor:.2f} the whole image"),
                ("estimated step time", f"× {estimate.relative_time:.2f} a whole-image step"),
                ("estimated peak memory", f"{format_bytes(estimate.peak_bytes)} (whole image: "
                                          f"{format_bytes(estimate.whole_image_bytes)})"),
            ]
        _, _, height, width = model.image_shape
        if len(model.stage_plans) > 1:
            rows.append(("stages (tiles × tile side in map px)", ", ".join(
                f"{p.stage.name}: {len(p.plan)} × {p.tile_size[0]}" for p in model.stage_plans)))
        if model.profiles and model.profiles[0]:
            top, left, bottom, right = model.profiles[0][-1].lost
            rows.append(("valid interior of a tile", f"{model.tile_size - top - bottom} × "
                         f"{model.tile_size - left - right} px (border lost: {top}/{bottom} px top/bottom, "
                         f"{left}/{right} px left/right)"))
        cells = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows)
        return (f'<table><tr><td>tile {model.tile_size} px on a {height} × {width} px image: tiles</td>'
                f'<td><b class="lightstream-tile-count">{tiles}</b></td></tr>{cells}</table>')

    def measure_step(self, wait: bool = False) -> threading.Thread | None:
        """Measure one real step in a background thread (what the button does).

        Returns the thread (joined already when ``wait``), or ``None`` when the tile size is
        invalid or a measurement is already running. The result lands in ``model.measurement``
        and under the statistics.
        """
        if self.model.plan is None or self._measuring is not None:
            return None
        self.measure_button.disabled = True
        self.measurement.value = f"<i>measuring one step at {self.model.tile_size} px…</i>"
        thread = threading.Thread(target=self._measure, name="lightstream-tile-tuner-step", daemon=True)
        self._measuring = thread
        thread.start()
        if wait:
            thread.join()
        return thread

    def _measure(self) -> None:
        try:
            result = self.model.measure_step()
            self.measurement.value = _measurement_html(result, self.model)
        except Exception as error:  # shown in the widget: a failing step must not kill the UI thread silently
            logger.exception("measuring one step failed")
            self.measurement.value = _red(f"step failed: {error!r}")
        finally:
            self._measuring = None
            self.measure_button.disabled = self.model.plan is None

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        return self.widget._repr_mimebundle_(**kwargs)


def _red(text: str, bold: bool = False) -> str:
    weight = ";font-weight:bold" if bold else ""
    return f'<div style="color:{_RED}{weight}">{html.escape(text)}</div>'


def _measurement_html(result: StepMeasurement, model: TileTunerModel) -> str:
    what = "forward + backward" if result.backward else "forward only (no trunk parameter requires grad)"
    text = (f"measured at {result.tile_size} px on {result.device}: <b>{result.seconds:.3f} s</b> per step "
            f"({what}), {result.memory_label} <b>{format_bytes(result.peak_bytes)}</b>")
    if model.estimate is not None and result.tile_size == model.tile_size:
        text += f" (estimated peak {format_bytes(model.estimate.peak_bytes)})"
    return text
