"""Fixtures shared by the block tests (self-contained: nothing from tests/conftest.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_threads_dtype():
    """Every test starts from the same RNG state, on one intra-op thread (the tensors are tiny;
    threads only add overhead on a shared machine), with the float32 default dtype."""
    torch.manual_seed(0)
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    torch.set_default_dtype(old_dtype)


@pytest.fixture
def dynamo_reset():
    """A clean torch.compile cache and counters before and after a compile test
    (``torch._dynamo.reset()`` leaves dynamo's counters as they were)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
