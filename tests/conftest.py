"""Shared test set-up: devices, the Triton interpreter, markers.

Where the tests run decides nothing by accident:
- Kernel tests take a ``device`` from tests/devices.py: CPU tensors always, CUDA tensors
  when a GPU is present. A CPU case that runs a Triton kernel needs the interpreter, and
  says so with the ``interpreter`` marker (``devices.triton_devices()`` adds it).
- Triton picks the interpreter when it is imported (``TRITON_INTERPRET=1``); it cannot run
  compiled kernels on CUDA tensors and interpreted ones on CPU tensors in one process (the
  interpreter cannot call triton's own compiled ``@jit`` helpers such as ``tl.sum``). So:
  without a GPU the interpreter is switched on here and everything runs in one pass; with a
  GPU this process compiles natively, the ``interpreter`` cases are skipped with that reason,
  and ``make test`` runs them in a second pass (``TRITON_INTERPRET=1 pytest -m interpreter``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from medlvr._backend import triton_interpret  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors, which needs "
                                       "TRITON_INTERPRET=1 when triton is imported (skipped otherwise)")
    config.addinivalue_line("markers", "slow: longer than a few seconds on CPU")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    no_interp = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1 before triton is "
                                        "imported (make test runs these in a second pass on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(no_cuda)
        if "interpreter" in item.keywords and not triton_interpret():
            item.add_marker(no_interp)
        if "cuda" in item.keywords and HAS_CUDA and triton_interpret():
            # an interpreter pass on a GPU machine: CUDA cases ran natively in the first pass
            item.add_marker(pytest.mark.skip(reason="CUDA cases run in the native (non-interpreter) pass"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny ops: on a small shared CPU, intra-op threads only add
    OpenMP wake-ups (measured here: a 2x64 linear ~2 ms with 2 threads, ~60 us with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
