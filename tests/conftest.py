"""Suite-wide test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models, for which one intra-op thread is faster than two (no OpenMP overhead
    or oversubscription when the machine is busy). Subprocess-based tests set their own threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
