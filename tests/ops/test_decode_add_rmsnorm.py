"""add_rmsnorm: Triton kernel vs reference vs what an HF decoder layer runs
(``residual + x`` then Qwen2RMSNorm).

Tolerances: the reference runs HF's exact ops, so it matches with rtol 0. The kernel adds
in fp32 and rounds once, like torch, so new_residual is bit-equal on every backend; its
norm sums squares in another order (IEEE sqrt/div), so normed may differ by one ulp of the
storage type in rare elements, as in tests/ops/test_decode_rmsnorm.py: bf16 rtol 2^-7
(8e-3), fp16 2^-10 (1e-3), fp32 1e-5.

Devices (tests/devices.py): Triton cases on CPU tensors under the interpreter and on CUDA
tensors natively; reference cases on CPU and CUDA.
"""
import pytest
import torch

import medlvr
from devices import backend_devices, triton_devices
from medlvr.ops.decode import add_rmsnorm
from medlvr.reference import decode as ref

RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _hf(x, residual, weight, eps):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(weight.shape[0], eps=eps).to(weight.device)
    norm.weight = torch.nn.Parameter(weight.clone())
    hidden = residual + x
    with torch.no_grad():
        return norm(hidden), hidden


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("x_dtype,r_dtype,w_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.float32, torch.float32),  # bf16 autocast: bf16 projection output, fp32 residual
    (torch.bfloat16, torch.bfloat16, torch.float32),  # fp32 weight: normed is fp32 (type promotion)
])
@pytest.mark.parametrize("B,D", [(1, 40), (3, 100)])
def test_matches_transformers(x_dtype, r_dtype, w_dtype, B, D, backend, device):
    g = torch.Generator().manual_seed(D + B)
    x = (torch.randn(B, D, generator=g) * 2).to(x_dtype).to(device)
    residual = (torch.randn(B, D, generator=g) * 3).to(r_dtype).to(device)
    weight = torch.randn(D, generator=g).to(w_dtype).to(device)
    want_normed, want_residual = _hf(x, residual, weight, 1e-6)
    with medlvr.force_backend(backend):
        normed, new_residual = add_rmsnorm(x, residual, weight, eps=1e-6)
    assert new_residual.dtype == want_residual.dtype and normed.dtype == want_normed.dtype
    assert torch.equal(new_residual, want_residual)
    rtol = 0 if backend == "reference" else RTOL[want_residual.dtype]
    torch.testing.assert_close(normed, want_normed, atol=1e-6 if rtol else 0, rtol=rtol)


@pytest.mark.parametrize("device", triton_devices())
def test_strided_rows(device):
    # The residual as the last position of a (B, T, D) state, x a column slice of a wider
    # projection output, a strided weight.
    B, T, D = 3, 2, 72
    states = torch.randn(B, T, D, device=device)
    x = torch.randn(B, 2 * D, device=device)[:, D:]
    weight = torch.randn(2 * D, device=device)[::2]
    with medlvr.force_backend("triton"):
        normed, new_residual = add_rmsnorm(x, states[:, -1], weight, eps=1e-5)
    want_normed, want_residual = ref.add_rmsnorm(x, states[:, -1], weight, eps=1e-5)
    assert torch.equal(new_residual, want_residual)
    torch.testing.assert_close(normed, want_normed, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", triton_devices())
def test_empty_batch(device):
    x = torch.randn(0, 16, device=device)
    with medlvr.force_backend("triton"):
        normed, new_residual = add_rmsnorm(x, x.clone(), torch.ones(16, device=device), eps=1e-6)
    assert normed.shape == new_residual.shape == (0, 16)


def test_fp64_is_computed_in_fp64():
    # fp64 rule: no forced backend -> the reference, in fp64 (an fp32 step would be ~1e-7 off).
    g = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 33), (2, 33), (33,)))
    normed, new_residual = add_rmsnorm(x, residual, weight, eps=1e-6)
    h = residual + x
    want = weight * h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(normed, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_residual, h)
    with medlvr.force_backend("triton"), pytest.raises(TypeError, match="x has dtype float64"):
        add_rmsnorm(x, residual, weight, eps=1e-6)


@pytest.mark.parametrize("patch,err,match", [
    (lambda a: a.update(x=a["x"][0]), ValueError, "x"),
    (lambda a: a.update(x=a["x"].long()), TypeError, "x"),
    (lambda a: a.update(residual=a["residual"][:, :-1]), ValueError, "residual"),
    (lambda a: a.update(residual=[1.0]), TypeError, "residual"),
    (lambda a: a.update(weight=a["weight"][:-1]), ValueError, "weight"),
    (lambda a: a.update(weight=a["weight"].int()), TypeError, "weight"),
    (lambda a: a.update(eps=-1.0), ValueError, "eps"),
    (lambda a: a.update(eps=None), ValueError, "eps"),
])
def test_bad_input(patch, err, match):
    a = dict(x=torch.randn(2, 8), residual=torch.randn(2, 8), weight=torch.randn(8), eps=1e-6)
    patch(a)
    with pytest.raises(err, match=match):
        add_rmsnorm(a.pop("x"), a.pop("residual"), a.pop("weight"), **a)


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 32])
def test_cuda_bf16_qwen_shape(B):
    D = 3584
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(B, D, device="cuda", dtype=torch.bfloat16) * 4
    weight = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    want_normed, want_residual = _hf(x, residual, weight, 1e-6)
    with medlvr.force_backend("triton"):
        normed, new_residual = add_rmsnorm(x, residual, weight, eps=1e-6)
    assert torch.equal(new_residual, want_residual)
    torch.testing.assert_close(normed, want_normed, atol=1e-6, rtol=8e-3)
