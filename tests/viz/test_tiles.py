"""plot_tile_grid, owned_region and thumbnail."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from lightstream import StreamingCNN
from lightstream.viz import owned_region, plot_tile_grid, thumbnail


def test_grid_draws_every_tile_and_states_counts(engine: StreamingCNN, artist: Callable) -> None:
    plan = engine.plan((200, 300))
    figure = plot_tile_grid(plan, torch.rand(1, 3, 200, 300), zoom=False)
    assert isinstance(figure, Figure)
    assert len(artist(figure, "input-boxes").get_paths()) == len(plan) > 1
    assert len(artist(figure, "owned-regions").get_paths()) == len(plan)
    title = figure.axes[0].get_title()
    assert f"{len(plan)} tiles ({plan.grid[0]}×{plan.grid[1]})" in title
    assert f"×{plan.recompute_factor:.2f}" in title
    assert "same tiles" in title  # the backward's tiles are the forward's
    assert artist(figure, "overlap") is not None
    assert artist(figure, "highlight-owned") is not None


def test_tile_count_follows_the_tile_size(engine: StreamingCNN, artist: Callable) -> None:
    counts = []
    for size in (48, 64, 128):
        engine.tile_size = (size, size)
        figure = plot_tile_grid(engine.plan((256, 256)), zoom=False)
        counts.append(len(artist(figure, "input-boxes").get_paths()))
    assert counts[0] > counts[1] > counts[2]


def test_new_figure_zooms_on_the_highlighted_tile_so_its_halo_shows(engine: StreamingCNN) -> None:
    engine.tile_size = (512, 512)
    plan = engine.plan((2048, 2048))
    figure = plot_tile_grid(plan)
    main, zoom = figure.axes
    assert zoom.get_gid() == "zoom" and figure.get_figwidth() <= 9.0
    tile = next(t for t in plan.tiles if t.index == (plan.grid[0] // 2, plan.grid[1] // 2))
    region = owned_region(tile, plan)
    halo = region.top - tile.input.top
    assert halo > 0
    (left, right), (bottom, top) = zoom.get_xlim(), zoom.get_ylim()
    # the zoom holds the halo's corner, and the halo spans at least 1/20 of it (a hairline in the main view)
    assert left < tile.input.left < region.left < right and top < tile.input.top < region.top < bottom
    assert halo / (right - left) >= 1 / 20
    assert halo / plan.image_size[1] < 1 / 200
    zoomed = {a.get_gid() for a in zoom.get_children()}
    assert {"highlight-input", "highlight-owned", "overlap", "input-boxes"} <= zoomed
    assert "zoom-area" in {a.get_gid() for a in main.get_children()}
    texts = [t.get_text() for t in figure.legends[0].get_texts()]
    assert f"tile {tile.index}: halo, read but not owned ({halo}/" in " ".join(texts)


def test_tiny_tiles_draw_a_subsampled_grid_not_a_plaid(engine: StreamingCNN, artist: Callable) -> None:
    engine.tile_size = (32, 32)
    plan = engine.plan((2048, 2048))
    assert max(plan.grid) > 32
    figure = plot_tile_grid(plan)
    drawn = len(artist(figure, "input-boxes").get_paths())
    assert 4 <= drawn <= 13 * 13 < len(plan)
    assert "overlap" not in {a.get_gid() for a in figure.axes[0].get_children()}
    assert any("per side drawn" in t.get_text() for t in figure.legends[0].get_texts())


def test_owned_regions_partition_the_covered_image(engine: StreamingCNN) -> None:
    plan = engine.plan((203, 157))
    covered = np.zeros(plan.image_size, dtype=int)
    for tile in plan.tiles:
        box = owned_region(tile, plan)
        inside = tile.input
        assert inside.top <= box.top and box.bottom <= inside.bottom
        assert inside.left <= box.left and box.right <= inside.right
        covered[box.rows, box.cols] += 1
    (sy, sx), (oh, ow) = plan.output_stride, plan.output_size
    assert covered.max() == 1
    assert covered.sum() == min(oh * sy, 203) * min(ow * sx, 157)


def test_one_tile_has_no_overlap_and_no_highlight(engine: StreamingCNN) -> None:
    engine.tile_size = (512, 512)
    figure = plot_tile_grid(engine.plan((100, 100)))
    gids = {a.get_gid() for a in figure.axes[0].get_children()}
    assert "overlap" not in gids and "highlight-owned" not in gids
    assert figure.axes[0].get_title().startswith("1 tile (1×1)")


def test_thumbnail_smaller_than_the_image_is_stretched_over_it(engine: StreamingCNN) -> None:
    plan = engine.plan((400, 600))
    small = np.zeros((40, 60, 3), dtype=np.uint8)
    figure = Figure()
    ax = figure.add_subplot()
    assert plot_tile_grid(plan, small, ax=ax) is figure
    (image,) = ax.images
    assert image.get_array().shape[:2] == (40, 60)
    assert tuple(image.get_extent()) == (0, 600, 400, 0)
    assert ax.get_xlim() == (0, 600) and ax.get_ylim() == (400, 0)


class _LazySlide:
    shape = (1, 3, 5000, 3000)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        return np.full((max_size, max_size * 3 // 5, 3), 200, dtype=np.uint8)


@pytest.mark.parametrize(("image", "shape"), [
    (torch.rand(2, 3, 50, 80), (50, 80, 3)),
    (torch.rand(1, 50, 80), (50, 80)),
    (np.zeros((50, 80), dtype=np.uint8), (50, 80)),
    (Image.new("RGB", (80, 50)), (50, 80, 3)),
    (torch.rand(1, 3, 4000, 1000), (1000, 250, 3)),
    (_LazySlide(), (1000, 600, 3)),
])
def test_thumbnail_accepts_tensors_arrays_images_and_slides(image: object, shape: tuple[int, ...]) -> None:
    array = thumbnail(image, max_size=1000)
    assert array.shape == shape
    if array.dtype != np.uint8:
        assert 0.0 <= array.min() and array.max() <= 1.0


def test_thumbnail_rejects_what_it_cannot_draw() -> None:
    with pytest.raises(TypeError, match="cannot draw"):
        thumbnail("not an image")


def test_a_host_can_leave_the_key_out(engine: StreamingCNN) -> None:
    figure = Figure()
    ax = figure.add_subplot()
    plot_tile_grid(engine.plan((200, 300)), ax=ax, legend=False)
    assert ax.get_legend() is None and not figure.legends
    plot_tile_grid(engine.plan((200, 300)), ax=ax)
    assert ax.get_legend() is not None


def test_zoom_on_a_given_axes_is_an_inset_on_the_chosen_tile(engine: StreamingCNN) -> None:
    plan = engine.plan((256, 256))
    figure = Figure()
    ax = figure.add_subplot()
    plot_tile_grid(plan, ax=ax, zoom=True, highlight=(0, 1))
    (inset,) = ax.child_axes
    tile = next(t for t in plan.tiles if t.index == (0, 1))
    (left, right), (bottom, top) = inset.get_xlim(), inset.get_ylim()
    assert left <= tile.input.left < right and top <= tile.input.top < bottom


def test_highlight_outside_the_grid_is_refused(engine: StreamingCNN) -> None:
    plan = engine.plan((256, 256))
    with pytest.raises(ValueError, match=r"highlight \(9, 0\) is outside the \d+×\d+ tile grid"):
        plot_tile_grid(plan, highlight=(9, 0))
