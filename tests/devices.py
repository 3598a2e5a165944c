"""Devices a kernel test runs on (see tests/conftest.py for why the interpreter is a marker)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
#: every device a kernel test runs on here: CPU tensors always, CUDA tensors with a GPU
KERNEL_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def triton_devices():
    """pytest params for a test that forces the Triton backend: CPU tensors (under the
    interpreter, marked ``interpreter``) and CUDA tensors (native, marked ``cuda``)."""
    return [pytest.param("cpu", marks=pytest.mark.interpreter, id="cpu-interpreted"),
            pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]


def kernel_devices():
    """pytest params for a test of a compiled (C++/CUDA) or reference path: CPU, and CUDA
    marked ``cuda``."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]


def backend_devices(backends=("reference", "triton")):
    """pytest params ``(backend, device)`` for a test run on several backends: ``triton``
    on triton_devices(), any other backend on kernel_devices(), with their marks."""
    params = []
    for backend in backends:
        for p in (triton_devices() if backend == "triton" else kernel_devices()):
            params.append(pytest.param(backend, p.values[0], marks=p.marks, id=f"{backend}-{p.id}"))
    return params
