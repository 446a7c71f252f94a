"""One JupyterLab on loopback for all browser tests, and headless Chromium to drive it (fixtures).

The server runs the venv's Python with a random free port, a random token and a temporary root
and configuration. The root holds ``notebooks/`` (copies of the tutorials with their CI-size
parameters injected, as ``scripts/run_notebooks.py --small`` runs them), ``scripts`` (a link to
the repository's, which the tutorials import from) and whatever a test writes there. It never
downloads a browser: it uses Debian's ``/usr/bin/chromium`` and skips without it, unless
``LIGHTSTREAM_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import json
import os
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
sys.path.insert(0, str(REPO / "scripts"))

import run_notebooks as runner  # scripts/run_notebooks.py: the tutorials and their CI sizes

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "output" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path

    def open_url(self, path: str, reset: bool = False) -> str:
        """The URL that opens ``path`` (relative to the root) in JupyterLab."""
        return f"{self.url}/lab/tree/{path}?{'reset&' if reset else ''}token={self.token}"

    def shut_down_kernels(self) -> None:
        """Stop every running kernel (frees a finished notebook's memory before the next one)."""
        for kernel in self._api("GET", "kernels"):
            self._api("DELETE", f"kernels/{kernel['id']}")

    def _api(self, method: str, path: str) -> list[dict]:
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _settings(settings: Path) -> None:
    """User settings: no news or update prompts; every cell kept in the page (no windowing)."""
    plugin = settings / "@jupyterlab" / "apputils-extension"
    plugin.mkdir(parents=True)
    (plugin / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    notebook = settings / "@jupyterlab" / "notebook-extension"
    notebook.mkdir(parents=True)
    (notebook / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))


def _prepare_notebooks(root: Path) -> None:
    """Copies of the tutorials at CI sizes, their figures going to ``root/output/<name>/``."""
    (root / "notebooks").mkdir()
    (root / "scripts").symlink_to(REPO / "scripts")
    for path in runner.notebook_paths():
        nb = nbformat.read(path, as_version=4)
        parameters = {"OUTPUT_DIR": str(root / "output" / path.stem), **runner.SMALL_PARAMETERS.get(path.stem, {})}
        runner.inject_parameters(nb, parameters, "small, browser test")
        nbformat.write(nb, root / "notebooks" / path.name)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A JupyterLab server of the venv's Python, with the repo on the kernels' path."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium); the browser tests need it"
        if os.environ.get("LIGHTSTREAM_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " and LIGHTSTREAM_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("jupyterlab")
    root, home = base / "root", base / "home"
    root.mkdir()
    _prepare_notebooks(root)
    _settings(home / "lab-settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **runner.kernel_environment(threads=1),   # the repo on PYTHONPATH, one PyTorch thread per kernel
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
        yield Lab(url, token, root, log)
    finally:
        _stop(server)


@pytest.fixture(scope="session")
def chromium(lab: Lab) -> Iterator[object]:
    """One headless Chromium for the session (pages are opened per test)."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


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
