"""Marlin tests run torch on one thread: their models are tiny, and on a shared 2-core machine
every parallel region of a second thread can wait a whole scheduler slice for it (seen:
15 ms per ``index_add_`` of a few hundred floats). Results do not depend on it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
