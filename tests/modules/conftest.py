"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run torch on one thread: these tensors are tiny, and on a shared CPU an intra-op thread
    pool spin-waits so much that a small convolution takes milliseconds instead of microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
