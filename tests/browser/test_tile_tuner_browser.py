"""TileTuner in a real JupyterLab, driven by headless Chromium (Playwright; see ``conftest.py``).

The test writes a small notebook into the session's JupyterLab, runs it in the browser, moves
the tile-size slider with the keyboard and checks that the displayed tile count follows. A
screenshot goes to ``output/browser/tile_tuner.png``.
"""

from __future__ import annotations

import re
import sys

import nbformat
import pytest

from tests.browser.jupyterlab import SCREENSHOTS, Lab

SCREENSHOT = SCREENSHOTS / "tile_tuner.png"
NOTEBOOK = "tile_tuner.ipynb"

CELLS = [
    "import torch\nfrom torch import nn\nfrom lightstream.widgets import TileTuner",
    # receptive field 20 px: the slider starts at 48 px (the first option of at least twice that)
    ("torch.manual_seed(0)\n"
    "trunk = nn.Sequential(\n"
    "    nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),\n"
    "    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
    "    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),\n"
    ").eval()\n"
    "image = torch.rand(1, 3, 512, 512)\n"
    "tuner = TileTuner(trunk, image, tile_sizes=range(16, 513, 16))\n"
    "tuner"),
]

pytestmark = pytest.mark.browser


def _write_notebook(lab: Lab) -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    nbformat.write(notebook, lab.root / NOTEBOOK)


def test_slider_changes_the_tile_count_in_jupyterlab(lab: Lab, chromium) -> None:
    from playwright.sync_api import expect

    _write_notebook(lab)
    page = chromium.new_page(viewport={"width": 1500, "height": 1100})
    try:
        page.goto(lab.open_url(NOTEBOOK, reset=True))
        status = page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle"))
        expect(status.first).to_be_visible(timeout=60_000)  # the kernel has started

        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

        count = page.locator(".lightstream-tuner .lightstream-tile-count")
        expect(count).to_be_visible(timeout=60_000)
        expect(page.locator("img.lightstream-tuner-grid-image")).to_be_visible()
        before = count.inner_text()
        assert re.fullmatch(r"\d+ \(\d+ × \d+\)", before), before

        readout = page.locator(".lightstream-tuner-slider .widget-readout")
        start = int(readout.inner_text())
        page.locator(".lightstream-tuner-slider .noUi-handle").focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")  # three options up: larger tiles, fewer of them
        expect(count).not_to_have_text(before, timeout=30_000)
        # the kernel redraws once per key; the text is written after the figures of the same redraw
        expect(readout).to_have_text(str(start + 3 * 16))
        stats = page.locator(".lightstream-tuner-stats")
        expect(stats).to_contain_text(f"tile {start + 3 * 16} px", timeout=30_000)
        after = count.inner_text()
        assert int(after.split()[0]) < int(before.split()[0]), (before, after)

        page.locator(".lightstream-tuner").scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # let the last PNG paint
        page.screenshot(path=str(SCREENSHOT))
    except Exception:
        page.screenshot(path=str(SCREENSHOT.with_name("tile_tuner_failure.png")))
        sys.stderr.write(lab.log.read_text()[-4000:])
        raise
    finally:
        page.close()
        lab.shut_down_kernels()
