"""TileTuner in a real JupyterLab, driven by headless Chromium (Playwright).

The test starts its own JupyterLab on loopback (random free port, a random token, a temporary
root and configuration), writes a small notebook there, runs it in the browser, moves the
tile-size slider with the keyboard and checks that the displayed tile count follows. A
screenshot goes to ``output/browser/tile_tuner.png``. It never downloads a browser: it uses
Debian's ``/usr/bin/chromium`` and skips without it, unless ``LIGHTSTREAM_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "output" / "browser" / "tile_tuner.png"
NOTEBOOK = "tile_tuner.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

CELLS = [
    "import torch\nfrom torch import nn\nfrom lightstream.widgets import TileTuner",
    # receptive field 20 px: the slider starts at 48 px (the first option of at least twice that)
    "torch.manual_seed(0)\n"
    "trunk = nn.Sequential(\n"
    "    nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),\n"
    "    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
    "    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),\n"
    ").eval()\n"
    "image = torch.rand(1, 3, 512, 512)\n"
    "tuner = TileTuner(trunk, image, tile_sizes=range(16, 513, 16))\n"
    "tuner",
]

pytestmark = pytest.mark.browser


@dataclass
class Lab:
    url: str
    token: str
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_notebook(root: Path) -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    nbformat.write(notebook, root / NOTEBOOK)


def _quiet_settings(settings: Path) -> None:
    """User settings that keep JupyterLab from asking about news and updates."""
    plugin = settings / "@jupyterlab" / "apputils-extension"
    plugin.mkdir(parents=True)
    (plugin / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A JupyterLab server of the venv's Python, with the repo on the kernel's path."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium); the browser test needs it"
        if os.environ.get("LIGHTSTREAM_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " and LIGHTSTREAM_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("jupyterlab")
    root, home = base / "root", base / "home"
    root.mkdir()
    _write_notebook(root)
    _quiet_settings(home / "lab-settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
        "MPLBACKEND": "agg",
    }
    log = base / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
               f"--IdentityProvider.token={token}", "--ServerApp.password=",
               "--LabApp.extension_manager=readonly",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:  # CI containers run as root
        command.append("--allow-root")
    with log.open("wb") as output:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{url}/api/status?token={token}", server, log)
        yield Lab(url, token, log)
    finally:
        _stop(server)


def _wait_until_up(status_url: str, server: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(status_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.25)
    pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server by its PID (it shuts its kernels down); SIGKILL its session if it hangs."""
    if server.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # its own session: the server and its kernels only
            server.wait(timeout=5)


def test_slider_changes_the_tile_count_in_jupyterlab(lab: Lab) -> None:
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        try:
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?reset&token={lab.token}")
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
            browser.close()
