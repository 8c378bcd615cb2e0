"""Shared test settings: one intra-op thread (CI has 2 cores and pytest runs beside other
work; oversubscribed BLAS threads make small-model tests orders of magnitude slower)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
