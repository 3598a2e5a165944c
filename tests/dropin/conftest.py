import os
import sys

import pytest

# the tiny models of the engine tests (tests/engine/engine_models.py)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "engine"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield
