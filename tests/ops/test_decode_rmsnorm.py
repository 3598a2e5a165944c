"""rmsnorm_feedback: Triton kernel vs reference vs transformers' Qwen2RMSNorm.

Tolerances: the reference equals HF exactly (same ops). The kernel sums squares in a
different order and uses IEEE sqrt/div, so its fp32 statistic can differ in the last
bit; after rounding to bf16/fp16 that is at most one ulp of the storage type in rare
elements: bf16 rtol 2^-7 (8e-3), fp16 2^-10 (1e-3), fp32 1e-5. The same on CUDA (the
interpreter emulates the GPU's roundings; the reference and HF run the same torch ops
on the same device, hence still rtol 0 between them).

Devices (tests/devices.py): Triton cases on CPU tensors under the interpreter and on
CUDA tensors natively; reference cases on CPU and CUDA.
"""
import pytest
import torch

import medlvr
from devices import backend_devices, triton_devices
from medlvr.ops.decode import rmsnorm_feedback
from medlvr.reference import decode as ref

RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _hf_norm(D, weight, eps):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(D, eps=eps)
    norm.weight = torch.nn.Parameter(weight.clone())
    return norm


def _run(backend, hidden, weight, out, **kw):
    with medlvr.force_backend(backend):
        return rmsnorm_feedback(hidden, weight, eps=1e-6, out=out, **kw)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("h_dtype,w_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),  # fp32 weight: HF's result is fp32 (type promotion)
])
@pytest.mark.parametrize("B,D", [(1, 40), (3, 100)])
def test_matches_transformers(h_dtype, w_dtype, B, D, backend, device):
    g = torch.Generator().manual_seed(D)
    hidden = (torch.randn(B, D, generator=g) * 3).to(h_dtype).to(device)
    weight = torch.randn(D, generator=g).to(w_dtype).to(device)
    with torch.no_grad():
        want = _hf_norm(D, weight, 1e-6)(hidden)
    res_dtype = torch.promote_types(h_dtype, w_dtype)
    assert want.dtype == res_dtype
    out = torch.full((B, D), float("nan"), dtype=res_dtype, device=device)
    got = _run(backend, hidden, weight, out)
    assert got is out
    rtol = 0 if backend == "reference" else RTOL[h_dtype]
    torch.testing.assert_close(out, want, atol=1e-6 if rtol else 0, rtol=rtol)


@pytest.mark.parametrize("device", triton_devices())
def test_active_rows_and_cast_into_out_dtype(device):
    B, D = 4, 48
    hidden = torch.randn(B, D, device=device)
    weight = torch.randn(D, device=device)
    active = torch.tensor([True, False, True, False], device=device)
    prev = torch.randn(B, D, device=device).to(torch.bfloat16)  # last step's latents of finished samples
    want = ref.rms_norm(hidden, weight, 1e-6).to(torch.bfloat16)
    out = prev.clone()
    with torch.inference_mode():
        got = _run("triton", hidden, weight, out, active=active)
    assert got is out
    assert torch.equal(out[~active], prev[~active])
    torch.testing.assert_close(out[active].float(), want[active].float(), atol=1e-6, rtol=8e-3)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_projector(backend, device):
    B, D, E = 3, 32, 24
    hidden, weight = torch.randn(B, D, device=device), torch.randn(D, device=device)
    proj = torch.nn.Linear(D, E).to(device)
    active = torch.tensor([True, True, False], device=device)
    out = torch.zeros(B, E, device=device)
    with torch.no_grad():
        normed = _run(backend, hidden, weight, out, active=active, projector=proj)
        want = ref.rms_norm(hidden, weight, 1e-6)
        torch.testing.assert_close(normed, want, atol=1e-6, rtol=1e-5)  # every row, normed
        torch.testing.assert_close(out[:2], proj(want)[:2], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2], torch.zeros(E, device=device))


@pytest.mark.parametrize("patch,err,match", [
    (lambda a: a.update(hidden=a["hidden"][0]), ValueError, "hidden"),
    (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
    (lambda a: a.update(weight=a["weight"][:-1]), ValueError, "weight"),
    (lambda a: a.update(out=a["out"][:, :-1]), ValueError, "out"),
    (lambda a: a.update(out=a["out"][:1]), ValueError, "out"),
    (lambda a: a.update(eps=-1.0), ValueError, "eps"),
    (lambda a: a.update(active=torch.ones(2, dtype=torch.int64)), TypeError, "active"),
    (lambda a: a.update(active=torch.ones(3, dtype=torch.bool)), ValueError, "active"),
    (lambda a: a.update(projector=3), TypeError, "projector"),
])
def test_bad_input(patch, err, match):
    a = dict(hidden=torch.randn(2, 8), weight=torch.randn(8), eps=1e-6, out=torch.empty(2, 8))
    patch(a)
    with pytest.raises(err, match=match):
        rmsnorm_feedback(a.pop("hidden"), a.pop("weight"), **a)


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 32])
def test_cuda_bf16_qwen_shape(B):
    D = 3584
    hidden = torch.randn(B, D, device="cuda", dtype=torch.bfloat16) * 4
    weight = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    want = _hf_norm(D, weight, 1e-6).cuda()(hidden)
    out = torch.empty_like(hidden)
    _run("triton", hidden, weight, out)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=8e-3)


@pytest.mark.parametrize("device", triton_devices())
def test_strided_hidden_weight_and_out(device):
    # The last position of a (B, T, D) hidden state, a strided weight and out rows that
    # are a view into a larger input-embedding buffer.
    B, T, D = 3, 4, 40
    states = torch.randn(B, T, D, device=device)
    weight = torch.randn(2 * D, device=device)[::2]
    big = torch.zeros(B, 2, D, device=device)
    out = big[:, 1]
    _run("triton", states[:, -1], weight, out)
    torch.testing.assert_close(out, ref.rms_norm(states[:, -1], weight, 1e-6), atol=1e-6, rtol=1e-5)
    assert torch.equal(big[:, 0], torch.zeros(B, D, device=device))
