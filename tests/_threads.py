"""One torch thread for the training tests: the models are tiny, and on a small shared CPU
OpenMP workers spinning against each other make a 2-thread step several times slower."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
