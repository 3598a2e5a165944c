"""Backend choice (medlvr._backend) and `medlvr info`."""
import pytest
import torch

import medlvr
from devices import triton_devices
from medlvr import _backend
from medlvr.cli import main

CPU = torch.device("cpu")


def test_default_on_cpu_is_the_extension_when_built_else_the_reference():
    want = "ext" if _backend.extension() is not None else "reference"
    assert _backend.choose(CPU, has_ext=True, has_triton=True) == want
    # Triton never runs on CPU tensors unless forced (it would be the slow interpreter)
    assert _backend.choose(CPU, has_ext=False, has_triton=True) == "reference"


@pytest.mark.parametrize("device", triton_devices())
def test_forcing_is_scoped_and_restored(device, monkeypatch):
    monkeypatch.delenv("MEDLVR_BACKEND", raising=False)
    dev = torch.device(device)
    assert _backend.forced() is None
    with medlvr.force_backend("reference"):
        assert _backend.forced() == "reference"
        assert _backend.choose(dev, has_ext=True, has_triton=True) == "reference"
        with medlvr.force_backend("triton"):
            assert _backend.choose(dev, has_ext=False, has_triton=True) == "triton"
        assert _backend.choose(dev, has_ext=True, has_triton=True) == "reference"
    assert _backend.forced() is None
    assert _backend.choose(dev, has_ext=False, has_triton=False) == "reference"


def test_forcing_a_backend_that_cannot_run_raises_instead_of_falling_back(monkeypatch):
    with medlvr.force_backend("ext"), pytest.raises(RuntimeError, match="no compiled kernel"):
        _backend.choose(CPU, has_ext=False, has_triton=True)
    with medlvr.force_backend("triton"), pytest.raises(RuntimeError, match="no Triton kernel"):
        _backend.choose(CPU, has_ext=True, has_triton=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with medlvr.force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.choose(CPU, has_ext=False, has_triton=True)


def test_bad_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with medlvr.force_backend("cuda"):
            pass
    monkeypatch.setenv("MEDLVR_BACKEND", "fast")
    with pytest.raises(ValueError, match="MEDLVR_BACKEND must be one of"):
        _backend.choose(CPU, has_ext=True, has_triton=True)
    monkeypatch.setenv("MEDLVR_BACKEND", "reference")
    assert _backend.choose(CPU, has_ext=True, has_triton=True) == "reference"


def test_info_reports_versions_backends_and_device(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"medlvr         {medlvr.__version__}" in out
    assert torch.__version__ in out
    built = "yes" if _backend.extension() is not None else "NO"
    assert f"C++ (CPU)    {built}" in out
    assert ("CUDA         yes" in out) == _backend.extension_has_cuda()
    assert "device         " + ("cuda" if torch.cuda.is_available() else "cpu") in out
