import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The engine tests run many tiny ops; on a shared 2-core machine intra-op threads
    # only add contention (a 2x64 linear takes ~2 ms with 2 threads, ~60 us with 1).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
