import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    # every engine test module runs many tiny ops (see tests/conftest.py)
    yield
