"""Shared test settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one intra-op thread, and on a shared 2-core machine OpenMP spinning
    otherwise slows them down many times over (measured 10-20x). Subprocesses set their own threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
