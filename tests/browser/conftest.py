"""Fixtures of the browser tests: one JupyterLab and one headless Chromium per session."""

from tests.browser.jupyterlab import chromium, lab  # noqa: F401  (pytest finds fixtures by name here)
