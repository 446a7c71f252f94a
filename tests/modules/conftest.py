"""Tiny tensors here: every test runs torch on one thread."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread: None) -> None:
    """See ``single_torch_thread`` in ``tests/conftest.py``."""
