"""`on_calling_thread`: small work drops torch to one thread for the block and restores the count."""

from __future__ import annotations

import pytest
import torch

from kt_core.calling_thread import SMALL_WORK, on_calling_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_work_runs_on_one_thread_and_the_count_comes_back(two_threads):
    with on_calling_thread(64 * 2048):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_large_work_keeps_the_threads(two_threads):
    with on_calling_thread(SMALL_WORK):
        assert torch.get_num_threads() == 2


def test_the_count_comes_back_after_an_error(two_threads):
    with pytest.raises(ZeroDivisionError), on_calling_thread(1):
        raise ZeroDivisionError
    assert torch.get_num_threads() == 2
