"""Suite-wide test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread_from_the_start():
    """One thread before any fixture runs too: a module-scoped fixture is built before the per-test
    :func:`one_thread`, and the reference outputs it records must come from the thread count the
    tests compare them at (float sums differ in the last bit between one and two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models, for which one intra-op thread is faster than two (no OpenMP overhead
    or oversubscription when the machine is busy). Subprocess-based tests set their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
