"""Shared test settings: one intra-op thread (CI has 2 cores and pytest runs beside other
work; oversubscribed BLAS threads make small-model tests orders of magnitude slower)."""
import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def no_norm_listeners():
    """For modules that count norm reads: start with no norm-registry listener. A monitor
    that another test file left unclosed stays registered (weakly) until the garbage
    collector frees it, so free it now."""
    from gradtrace import norms
    gc.collect()
    norms._live_observers()
    assert not norms._observers, "a norm-registry listener is still alive"
