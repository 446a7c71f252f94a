"""Every tutorial notebook with Run All in a real JupyterLab, in headless Chromium at 1366×768.

As a new user on a laptop would: open the notebook (at CI sizes, see ``jupyterlab.py``), Run
All Cells, wait until every code cell has run. Then no cell shows an error or writes to stderr
(tracebacks, warnings, log lines), every widget rendered (no "Error displaying widget", none
still loading), and each tile tuner fits the 1366×768 screen at 100 % zoom. A screenshot of
the end of each notebook (and of its tuner) goes to ``output/browser/<notebook>.png``.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.browser.jupyterlab import SCREENSHOTS, Lab, runner

pytestmark = pytest.mark.browser

NOTEBOOKS = runner.notebook_paths()
SCREEN = {"width": 1366, "height": 768}
RUN_TIMEOUT_S = 300.0


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_all_in_jupyterlab(lab: Lab, chromium, notebook: Path) -> None:
    from playwright.sync_api import expect

    page = chromium.new_page(viewport=SCREEN)
    screenshot = SCREENSHOTS / f"{notebook.stem}.png"
    try:
        page.goto(lab.open_url(f"notebooks/{notebook.name}", reset=True))
        status = page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle"))
        expect(status.first).to_be_visible(timeout=60_000)  # the kernel has started
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        _wait_until_every_cell_ran(page, notebook.name)

        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
        assert errors.count() == 0, f"{notebook.name}: error output:\n{errors.first.inner_text()[:2000]}"
        stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        assert stderr.count() == 0, f"{notebook.name}: output on stderr:\n{stderr.first.inner_text()[:2000]}"

        page.wait_for_timeout(1000)   # let the widget views finish rendering
        body = page.locator(".jp-Notebook").inner_text()
        assert "Error displaying widget" not in body, f"{notebook.name}: a widget failed to render"
        assert "Loading widget" not in body, f"{notebook.name}: a widget never rendered"

        page.locator(".jp-Notebook .jp-Cell").last.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        page.screenshot(path=str(screenshot))   # the end of the notebook
        for index, tuner in enumerate(page.locator(".lightstream-tuner").all()):
            tuner.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            page.screenshot(path=str(SCREENSHOTS / f"{notebook.stem}_tuner{index}.png"))
            box = tuner.bounding_box()
            assert box is not None, f"{notebook.name}: tuner {index} is not displayed"
            assert box["width"] <= SCREEN["width"] and box["height"] <= SCREEN["height"], (
                f"{notebook.name}: tuner {index} is {box['width']:.0f}×{box['height']:.0f} px, "
                f"larger than a {SCREEN['width']}×{SCREEN['height']} screen")
    except Exception:
        page.screenshot(path=str(screenshot.with_name(f"{notebook.stem}_failure.png")))
        sys.stderr.write(lab.log.read_text()[-4000:])
        raise
    finally:
        page.close()
        lab.shut_down_kernels()


def _wait_until_every_cell_ran(page, name: str) -> None:
    """Until every code cell has an execution count (none queued ``[*]`` or never run ``[ ]``)."""
    prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    texts: list[str] = []
    while time.monotonic() < deadline:
        texts = [t.strip() for t in prompts.all_inner_texts()]
        if texts and all(re.fullmatch(r"\[\d+\]:", t) for t in texts):
            return
        if page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]').count():
            return   # Run All stops at an error: the caller reports it
        page.wait_for_timeout(500)
    pytest.fail(f"{name}: not every cell ran within {RUN_TIMEOUT_S:.0f} s; prompts: {texts}")
