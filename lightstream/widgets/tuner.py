"""An interactive tile-size tuner: a slider over :class:`~lightstream.widgets.model.TileTunerModel`."""

from __future__ import annotations

import base64
import html
import io
import logging
import textwrap
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from lightstream.viz import format_bytes, plot_receptive_profile, plot_tile_grid

from .model import StepMeasurement, TileTunerModel, estimate_disagreement

__all__ = ["TileTuner"]

logger = logging.getLogger(__name__)

_RED = "#b00020"


class TileTuner:
    """Pick a tile size by looking: tile grid, layer profile and step estimate follow a slider.

    Shows the number of tiles, the recompute factor, the estimated peak memory and relative
    step time of the chosen tile size, or a warning naming the smallest valid tile. The slider
    offers one tile side per distinct plan (see :attr:`TileTunerModel.tile_sizes`). A button
    measures one real forward and backward step in a background thread, with a progress bar
    over tile runs and a Cancel button that stops it at the next tile. All state lives in
    :attr:`model` (a :class:`TileTunerModel`); this class only draws it.

    Laid out for a 1366×768 screen: controls and figures on the left (``lightstream-tuner-controls``),
    the tile grid and the layer profile as tabs on the right (``lightstream-tuner-plots``); the
    whole widget carries the CSS class ``lightstream-tuner``.

    Given a :class:`StreamingCNN` (or a module holding one), the tuner and the engine stay in
    sync (``link=True``): moving the slider sets the engine's tile size, and a tile size set on
    the engine in code shows on the slider after the cell runs (or at :meth:`sync`).

    Args:
        model_or_trunk, image, tile_sizes, tile_size: see :class:`TileTunerModel`.
        figsize: size (inches) of the tile-grid figure; the profile figure is as tall and
            ``profile_width`` wide. Both are shown as PNGs of ``dpi`` dots per inch; the profile
            is rendered again only when it changes (it rarely depends on the tile size).
        link: keep the given engine's tile size and the slider equal (no effect for a bare trunk).

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
        figsize: tuple[float, float] = (4.6, 4.6),
        profile_width: float = 6.0,
        dpi: int = 72,
        link: bool = True,
    ) -> None:
        self.model = TileTunerModel(model_or_trunk, image, tile_sizes, tile_size=tile_size,
                                    thumbnail_size=2 * round(max(figsize) * dpi))
        self.link = link and self.model.target is not None
        self.grid_figure = Figure(figsize=figsize, layout="constrained")
        self.profile_figure = Figure(figsize=(profile_width, 1.45 * figsize[1]), layout="constrained")
        self.dpi = dpi
        self._drawn_profiles: list | None = None
        self.last_redraw_seconds = 0.0
        """Wall time of the last redraw (plan, estimate, both plots and the PNG)."""
        self._measuring: threading.Thread | None = None
        self._cancel = threading.Event()
        self._engine_tile = self._target_tile()

        self.slider = widgets.SelectionSlider(
            options=self.model.tile_sizes, value=self.model.tile_size, description="tile size (px)",
            continuous_update=False, style={"description_width": "initial"},
            layout=widgets.Layout(width="100%"))
        self.measure_button = widgets.Button(
            description="measure one step", icon="stopwatch",
            tooltip="run one real forward + backward of the streamed trunk at this tile size",
            layout=widgets.Layout(width="auto"))
        self.cancel_button = widgets.Button(
            description="cancel", icon="stop", disabled=True, tooltip="stop the measurement at the next tile",
            layout=widgets.Layout(width="auto"))
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="tile runs",
                                            style={"description_width": "initial"},
                                            layout=widgets.Layout(width="100%", visibility="hidden"))
        self.warning = widgets.HTML()
        self.stats = widgets.HTML()
        self.measurement = widgets.HTML()
        self.grid_image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.profile_image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        names = ("slider", "measure_button", "cancel_button", "progress", "warning", "stats", "measurement",
                 "grid_image", "profile_image")
        for name in names:
            getattr(self, name).add_class(f"lightstream-tuner-{name.replace('_', '-')}")
        controls = widgets.VBox(
            [self.slider, widgets.HBox([self.measure_button, self.cancel_button]), self.progress, self.warning,
             self.stats, self.measurement],
            layout=widgets.Layout(width="340px", flex="0 0 auto"))
        controls.add_class("lightstream-tuner-controls")
        plots = widgets.Tab([self.grid_image, self.profile_image], titles=("tile grid", "layer profile"),
                            layout=widgets.Layout(width=f"{round(profile_width * dpi) + 24}px", flex="0 1 auto"))
        plots.add_class("lightstream-tuner-plots")
        self.widget = widgets.HBox([controls, plots], layout=widgets.Layout(flex_flow="row nowrap",
                                                                             align_items="flex-start"))
        self.widget.add_class("lightstream-tuner")
        self.slider.observe(self._on_slide, names="value")
        self.measure_button.on_click(lambda _button: self.measure_step())
        self.cancel_button.on_click(lambda _button: self.cancel())
        self.redraw()
        _sync_after_each_cell(self)

    @property
    def tile_size(self) -> int:
        """The chosen tile side in pixels; setting it snaps to the option with the same plan (or
        adds a side whose plan is new) and moves the slider."""
        return self.model.tile_size

    @tile_size.setter
    def tile_size(self, value: int) -> None:
        side = self.model.snap(value)
        if list(self.slider.options) != self.model.tile_sizes:
            self.slider.options = self.model.tile_sizes
        self.slider.value = side

    def apply(self) -> None:
        """Set the chosen tile size on the ``StreamingCNN`` the tuner was given."""
        self.model.apply()
        self._engine_tile = self._target_tile()

    def sync(self) -> None:
        """Show a tile size set on the given engine in code since the last look (no-op otherwise).

        Called after every cell in a notebook kernel; a changed engine moves the slider to the
        option with the same plan, without setting the engine back.
        """
        tile = self._target_tile()
        if tile is None or tile == self._engine_tile:
            return
        self._engine_tile = tile
        link, self.link = self.link, False
        try:
            self.tile_size = tile
        finally:
            self.link = link

    def _target_tile(self) -> int | None:
        target = self.model.target
        return None if target is None else target.tile_size[0]

    def _on_slide(self, change: dict[str, Any]) -> None:
        self.model.tile_size = change["new"]
        if self.link and self.model.plan is not None:
            self.apply()
        self.redraw()

    def redraw(self) -> None:
        """Render the model's current state into the widgets (figures first, then the text)."""
        start = time.perf_counter()
        model = self.model
        self.grid_figure.clear()
        grid_ax = self.grid_figure.add_subplot()
        if model.plan is not None:
            plot_tile_grid(model.plan, model.thumbnail, ax=grid_ax, legend=False)  # the stats say what it shows
        else:
            grid_ax.set_axis_off()
            grid_ax.text(0.5, 0.5, f"no tiling at {model.tile_size} px:\ntile smaller than\n"
                         f"the minimum of {model.minimum_tile_size} px", ha="center", va="center",
                         color=_RED, transform=grid_ax.transAxes)
        self.grid_image.value = self._png(self.grid_figure)
        if model.profiles != self._drawn_profiles:
            self.profile_figure.clear()
            axes = self.profile_figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
            plot_receptive_profile(model.profiles, ax=(axes[0], axes[1]))
            _key_below(self.profile_figure, axes[0])
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
                ("estimated peak memory (tensors)", (f"{format_bytes(estimate.peak_bytes)} (whole image: "
                                                     f"{format_bytes(estimate.whole_image_bytes)})")),
            ]
        _, _, height, width = model.image_shape
        if len(model.stage_plans) > 1:
            rows.append(("stages (tiles × tile side in map px)", ", ".join(
                f"{p.stage.name}: {len(p.plan)} × {p.tile_size[0]}" for p in model.stage_plans)))
        if model.profiles and model.profiles[0]:
            top, left, bottom, right = model.profiles[0][-1].lost
            rows.append(("valid interior of a tile", (f"{model.tile_size - top - bottom} × "
                         f"{model.tile_size - left - right} px (border lost: {top}/{bottom} px top/bottom, "
                         f"{left}/{right} px left/right)")))
        cells = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows)
        return (f'<table style="font-size:90%"><tr><td>tile {model.tile_size} px on a {height} × {width} px '
                f'image: tiles</td><td><b class="lightstream-tile-count">{tiles}</b></td></tr>{cells}</table>')

    def measure_step(self, wait: bool = False) -> threading.Thread | None:
        """Measure one real step in a background thread (what the button does).

        Returns the thread (joined already when ``wait``), or ``None`` when the tile size is
        invalid or a measurement is already running. The progress bar counts tile runs; the
        result lands in ``model.measurement`` and under the statistics.
        """
        if self.model.plan is None or self._measuring is not None:
            return None
        self._cancel.clear()
        self.measure_button.disabled = True
        self.cancel_button.disabled = False
        self.progress.value, self.progress.max = 0, 1
        self.progress.layout.visibility = "visible"
        self.measurement.value = f"<i>measuring one step at {self.model.tile_size} px…</i>"
        thread = threading.Thread(target=self._measure, name="lightstream-tile-tuner-step", daemon=True)
        self._measuring = thread
        thread.start()
        if wait:
            thread.join()
        return thread

    def cancel(self) -> None:
        """Stop a running measurement at its next tile (the tuner and the trunk stay usable)."""
        self._cancel.set()

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, done, 1)
        self.progress.value = done

    def _measure(self) -> None:
        try:
            result = self.model.measure_step(progress=self._on_progress, cancel=self._cancel)
            if result is None:
                self.measurement.value = (f"<i>cancelled after {self.progress.value} of {self.progress.max} "
                                          "tile runs: nothing measured</i>")
            else:
                self.measurement.value = _measurement_html(result, self.model)
        except Exception as error:  # shown in the widget: a failing step must not kill the UI thread silently
            logger.exception("measuring one step failed")
            self.measurement.value = _red(f"step failed: {error!r}")
        finally:
            self._measuring = None
            self.cancel_button.disabled = True
            self.progress.layout.visibility = "hidden"
            self.measure_button.disabled = self.model.plan is None

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """The widget view, plus a static PNG of the tile grid and an HTML page of the figures
        and figures' text: what a front end without the live kernel shows instead."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        grid, profile = bytes(self.grid_image.value), bytes(self.profile_image.value)
        bundle["image/png"] = base64.b64encode(grid).decode("ascii")
        images = "".join(f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
                         f'style="max-width:100%">' for png in (grid, profile) if png)
        bundle["text/html"] = (f'<div class="lightstream-tuner-static"><p><i>Tile tuner, as last drawn '
                               f'(run the cell to move the slider).</i></p>{self.warning.value}{self.stats.value}'
                               f'{self.measurement.value}<div>{images}</div></div>')
        return bundle


def _sync_after_each_cell(tuner: TileTuner) -> None:
    """In a notebook kernel, call ``tuner.sync()`` after every cell while the tuner is alive."""
    if tuner.model.target is None:
        return
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    reference = weakref.ref(tuner)

    def sync(*_args: Any) -> None:
        alive = reference()
        if alive is None:
            shell.events.unregister("post_run_cell", sync)
        else:
            alive.sync()

    shell.events.register("post_run_cell", sync)


def _key_below(figure: Figure, ax: Axes) -> None:
    """Move ``ax``'s key under the figure, where it covers no curve in a narrow widget, and wrap
    its title to the widget's width."""
    ax.set_title("\n".join(textwrap.fill(line, 52) for line in ax.get_title().split("\n")), pad=18)
    key = ax.get_legend()
    if key is not None:
        handles, labels = key.legend_handles, [text.get_text() for text in key.get_texts()]
        key.remove()
        figure.legend(handles, labels, loc="outside lower center", ncols=2)


def _red(text: str, bold: bool = False) -> str:
    weight = ";font-weight:bold" if bold else ""
    return f'<div style="color:{_RED}{weight}">{html.escape(text)}</div>'


def _measurement_html(result: StepMeasurement, model: TileTunerModel) -> str:
    what = "forward + backward" if result.backward else "forward only (no trunk parameter requires grad)"
    text = (f"measured at {result.tile_size} px on {result.device}: <b>{result.seconds:.3f} s</b> per step "
            f"({what}); <b>tensor peak {format_bytes(result.peak_bytes)}</b>")
    note = None
    if model.estimate is not None and result.tile_size == model.tile_size:
        estimated = model.estimate.peak_bytes
        text += f" vs estimated {format_bytes(estimated)} (×{result.peak_bytes / max(1, estimated):.2f})"
        note = estimate_disagreement(result.peak_bytes, estimated)
    text += (f'<br><span style="color:#555">process RSS growth {format_bytes(result.rss_bytes)}: '
             f"{html.escape(result.rss_reason)}, so it is not comparable to the estimate</span>")
    if note:
        text += _red(note)
    return f'<div class="lightstream-tuner-measured">{text}</div>'
