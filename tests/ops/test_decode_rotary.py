"""rotary_append: Triton kernel vs reference vs transformers' own rotary code.

Tolerances: fp32 outputs within 1e-5 (the reference is bit-identical to HF on CPU; the
kernel may fuse multiply-adds and uses numpy's cos/sin under the interpreter). bf16/fp16
outputs are compared against the fp32 reference of the same (upcast) inputs with rtol of
one rounding of the storage type: bf16 2^-8 (+ slack) = 8e-3, fp16 2^-11 -> 1e-3.
The same on CUDA: the kernel takes cos/sin from libdevice there (accurate at 10^4 rad),
and the reference and HF run the same torch ops on the same device (still exact).

Devices (tests/devices.py): Triton cases on CPU tensors under the interpreter and on
CUDA tensors natively; reference cases on CPU and CUDA.
"""
import pytest
import torch

import medlvr
from devices import backend_devices, kernel_devices, triton_devices
from medlvr.ops.decode import rotary_append
from medlvr.reference import decode as ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=8e-3),
       torch.float16: dict(atol=1e-5, rtol=1e-3)}


def _inv_freq(rd, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))


def _case(B, Hq, Hkv, Dh, L, dtype, *, mrope=False, B_max=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Dh, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Dh, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Dh, generator=g).to(dtype)
    B_max = B_max or B
    kc = torch.randn(B_max, Hkv, L, Dh, generator=g).to(dtype)
    vc = torch.randn(B_max, Hkv, L, Dh, generator=g).to(dtype)
    shape = (3, B) if mrope else (B,)
    # Positions far from 0 exercise the trig range reduction (HF feeds up to ~10^4).
    positions = torch.randint(0, 5000, shape, generator=g)
    return tuple(t.to(device) for t in (q, k, v, kc, vc, positions))


def _run(backend, q, k, v, kc, vc, **kw):
    kc, vc = kc.clone(), vc.clone()
    with medlvr.force_backend(backend):
        q_rot = rotary_append(q, k, v, k_cache=kc, v_cache=vc, **kw)
    return q_rot, kc, vc


# ------------------------------------------------------------------ against transformers
@pytest.mark.parametrize("backend,device", backend_devices())
def test_mrope_matches_transformers_qwen2_5_vl(backend, device):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    B, Hq, Hkv, Dh, L = 3, 4, 2, 16, 8
    sec = [2, 3, 3]
    cfg = Qwen2_5_VLTextConfig(hidden_size=Hq * Dh, num_attention_heads=Hq, num_key_value_heads=Hkv,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sec})
    rope = hf.Qwen2_5_VLRotaryEmbedding(cfg).to(device)
    q, k, v, kc, vc, pos = _case(B, Hq, Hkv, Dh, L, torch.float32, mrope=True, device=device)
    pos[:, 1] = 7  # a text-like position: all sections equal
    cos, sin = rope(q[:, :, None, :], pos[:, :, None])  # (B, 1, Dh)
    q_hf, k_hf = hf.apply_rotary_pos_emb(q[:, :, None, :], k[:, :, None, :], cos, sin)
    slots = torch.tensor([0, 5, L - 1], device=device)
    kw = dict(positions=pos, inv_freq=rope.inv_freq, mrope_section=tuple(sec), slots=slots)
    tol = dict(atol=0, rtol=0) if backend == "reference" else TOL[torch.float32]
    q_rot, kc2, vc2 = _run(backend, q, k, v, kc, vc, **kw)
    torch.testing.assert_close(q_rot, q_hf[:, :, 0], **tol)
    for b in range(B):
        torch.testing.assert_close(kc2[b, :, slots[b]], k_hf[b, :, 0], **tol)
        torch.testing.assert_close(vc2[b, :, slots[b]], v[b], atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_plain_rope_matches_transformers(family, backend, device):
    if family == "qwen2":
        from transformers import Qwen2Config as Cfg
        from transformers.models.qwen2 import modeling_qwen2 as hf
        Emb = hf.Qwen2RotaryEmbedding
    else:
        from transformers import LlamaConfig as Cfg
        from transformers.models.llama import modeling_llama as hf
        Emb = hf.LlamaRotaryEmbedding
    B, Hq, Hkv, Dh, L = 2, 6, 3, 24, 5  # Dh = 24: not a power of two
    rope = Emb(Cfg(hidden_size=Hq * Dh, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=Dh)).to(device)
    q, k, v, kc, vc, pos = _case(B, Hq, Hkv, Dh, L, torch.float32, device=device)
    cos, sin = rope(q[:, :, None, :], pos[:, None])
    q_hf, k_hf = hf.apply_rotary_pos_emb(q[:, :, None, :], k[:, :, None, :], cos, sin)
    slots = torch.tensor([4, 1], device=device)
    tol = dict(atol=0, rtol=0) if backend == "reference" else TOL[torch.float32]
    q_rot, kc2, _ = _run(backend, q, k, v, kc, vc, positions=pos, inv_freq=rope.inv_freq, slots=slots)
    torch.testing.assert_close(q_rot, q_hf[:, :, 0], **tol)
    torch.testing.assert_close(kc2[torch.arange(B, device=device), :, slots], k_hf[:, :, 0], **tol)


# ------------------------------------------------------------------ kernel vs reference
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,Dh,mrope", [(2, 2, 40, False), (4, 2, 16, True), (7, 1, 24, False)])
def test_kernel_matches_reference(dtype, Hq, Hkv, Dh, mrope, device):
    B, L = 3, 6
    q, k, v, kc, vc, pos = _case(B, Hq, Hkv, Dh, L, dtype, mrope=mrope, B_max=B + 1, device=device)
    sec = {16: (2, 3, 3)}.get(Dh) if mrope else None
    # One finished sample (slot -1), one at the first and one at the last cache slot.
    slots = torch.tensor([0, -1, L - 1], dtype=torch.int32, device=device)
    kw = dict(positions=pos, inv_freq=_inv_freq(Dh).to(device), mrope_section=sec, slots=slots)
    q_t, kc_t, vc_t = _run("triton", q, k, v, kc, vc, **kw)
    # fp32 reference of the same values, compared at the storage precision.
    q_r, kc_r, vc_r = _run("reference", q.float(), k.float(), v.float(), kc.float(), vc.float(), **kw)
    assert q_t.dtype == dtype and q_t.shape == q.shape
    torch.testing.assert_close(q_t.float(), q_r, **TOL[dtype])
    torch.testing.assert_close(kc_t.float(), kc_r, **TOL[dtype])
    torch.testing.assert_close(vc_t, vc_r.to(dtype), atol=0, rtol=0)  # v is copied, not computed
    # Nothing but the written slots changed: the finished sample and the spare row too.
    changed = (kc_t != kc).any(dim=-1).any(dim=1)  # (B_max, L)
    expect = torch.zeros_like(changed)
    expect[0, 0] = expect[2, L - 1] = True
    assert torch.equal(changed, expect)
    assert torch.equal(vc_t[1], vc[1]) and torch.equal(vc_t[3], vc[3])


@pytest.mark.parametrize("device", triton_devices())
def test_partial_rotary_dim_and_out_buffer(device):
    B, Hq, Hkv, Dh, L, rd = 2, 2, 1, 24, 4, 16
    q, k, v, kc, vc, pos = _case(B, Hq, Hkv, Dh, L, torch.float32, device=device)
    kw = dict(positions=pos, inv_freq=_inv_freq(rd).to(device), slots=torch.tensor([1, 3], device=device),
              rotary_dim=rd)
    out = torch.full_like(q, float("nan"))
    with medlvr.force_backend("triton"):
        kc_t, vc_t = kc.clone(), vc.clone()
        res = rotary_append(q, k, v, k_cache=kc_t, v_cache=vc_t, out=out, **kw)
    assert res is out
    q_r, kc_r, _ = _run("reference", q, k, v, kc, vc, **kw)
    torch.testing.assert_close(out, q_r, **TOL[torch.float32])
    torch.testing.assert_close(kc_t, kc_r, **TOL[torch.float32])
    assert torch.equal(out[..., rd:], q[..., rd:])  # dims past rotary_dim pass through
    # The rotated part is not the identity (the test would pass vacuously otherwise).
    assert not torch.allclose(out[..., :rd], q[..., :rd])


@pytest.mark.parametrize("device", triton_devices())
def test_b1_inference_mode(device):
    q, k, v, kc, vc, pos = _case(1, 2, 1, 16, 3, torch.bfloat16, mrope=True, device=device)
    kw = dict(positions=pos, inv_freq=_inv_freq(16).to(device), mrope_section=(4, 2, 2),
              slots=torch.tensor([2], device=device))
    with torch.inference_mode():
        q_t, kc_t, _ = _run("triton", q, k, v, kc, vc, **kw)
    q_r, kc_r, _ = _run("reference", q, k, v, kc, vc, **kw)
    torch.testing.assert_close(q_t.float(), q_r.float(), atol=1e-5, rtol=8e-3)
    torch.testing.assert_close(kc_t.float(), kc_r.float(), atol=1e-5, rtol=8e-3)


@pytest.mark.parametrize("device", kernel_devices())
def test_fp64_runs_on_reference(device):
    q, k, v, kc, vc, pos = _case(2, 2, 1, 8, 3, torch.float64, device=device)
    inv = _inv_freq(8).double().to(device)
    q_rot, _, _ = _run("reference", q, k, v, kc, vc, positions=pos, inv_freq=inv,
                       slots=torch.tensor([0, 1], device=device))
    cos, sin = ref.rope_cos_sin(pos, inv, None, torch.float64)
    assert q_rot.dtype == torch.float64
    torch.testing.assert_close(q_rot[:, :, :4], q[:, :, :4] * cos[:, None, :4] - q[:, :, 4:] * sin[:, None, :4])


# ------------------------------------------------------------------ bad input
def _good():
    q, k, v, kc, vc, pos = _case(2, 4, 2, 16, 4, torch.float32, mrope=True)
    return dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, positions=pos, inv_freq=_inv_freq(16),
                mrope_section=(2, 3, 3), slots=torch.tensor([0, 1]))


@pytest.mark.parametrize("patch,err,match", [
    (lambda a: a.update(q=a["q"].half()), TypeError, "k and v"),
    (lambda a: a.update(k=a["k"][:, :1].repeat(1, 3, 1), v=a["v"][:, :1].repeat(1, 3, 1)), ValueError, "multiple"),
    (lambda a: a.update(positions=a["positions"][0]), ValueError, "positions"),
    (lambda a: a.update(positions=a["positions"].float()), TypeError, "positions"),
    (lambda a: a.update(mrope_section=(2, 3, 4)), ValueError, "mrope_section"),
    (lambda a: a.update(mrope_section=(4, 4)), ValueError, "mrope_section"),
    (lambda a: a.update(inv_freq=_inv_freq(12)), ValueError, "inv_freq"),
    (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError, "k_cache"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :3]), ValueError, "v_cache"),
    (lambda a: a.update(slots=torch.tensor([0, 4])), ValueError, "slots"),
    (lambda a: a.update(slots=torch.tensor([0.0, 1.0])), TypeError, "slots"),
    (lambda a: a.update(rotary_dim=10), ValueError, "inv_freq"),
    (lambda a: a.update(rotary_dim=7), ValueError, "rotary_dim"),
    (lambda a: a.update(out=torch.empty(2, 4, 8)), ValueError, "out"),
])
def test_bad_input(patch, err, match):
    a = _good()
    patch(a)
    with pytest.raises(err, match=match):
        rotary_append(a.pop("q"), a.pop("k"), a.pop("v"), **a)


def test_odd_head_dim_rejected():
    q = torch.randn(1, 1, 7)
    with pytest.raises(ValueError, match="even"):
        rotary_append(q, q, q, positions=torch.zeros(1, dtype=torch.long), inv_freq=torch.ones(3),
                      k_cache=torch.zeros(1, 1, 2, 7), v_cache=torch.zeros(1, 1, 2, 7), slots=torch.zeros(1))


@pytest.mark.cuda
def test_cuda_bf16_qwen_shape():
    B, Hq, Hkv, Dh, L = 8, 28, 4, 128, 64
    q, k, v, kc, vc, pos = [t.cuda() for t in _case(B, Hq, Hkv, Dh, L, torch.bfloat16, mrope=True)]
    slots = torch.arange(B, device="cuda") * 7 % L
    slots[3] = -1
    kw = dict(positions=pos, inv_freq=_inv_freq(Dh).cuda(), mrope_section=(16, 24, 24), slots=slots)
    q_t, kc_t, vc_t = _run("triton", q, k, v, kc, vc, **kw)
    q_r, kc_r, vc_r = _run("reference", q.float(), k.float(), v.float(), kc.float(), vc.float(), **kw)
    torch.testing.assert_close(q_t.float(), q_r, **TOL[torch.bfloat16])
    torch.testing.assert_close(kc_t.float(), kc_r, **TOL[torch.bfloat16])
    torch.testing.assert_close(vc_t.float(), vc_r, atol=0, rtol=0)


@pytest.mark.parametrize("device", triton_devices())
def test_strided_views_of_a_fused_qkv_projection(device):
    # Engines slice q, k, v out of one fused projection: non-contiguous rows.
    B, Hq, Hkv, Dh, L = 2, 4, 2, 16, 3
    qkv = torch.randn(B, (Hq + 2 * Hkv) * Dh, device=device)
    q = qkv[:, : Hq * Dh].view(B, Hq, Dh)
    k = qkv[:, Hq * Dh: (Hq + Hkv) * Dh].view(B, Hkv, Dh)
    v = qkv[:, (Hq + Hkv) * Dh:].view(B, Hkv, Dh)
    _, _, _, kc, vc, pos = _case(B, Hq, Hkv, Dh, L, torch.float32, mrope=True, device=device)
    inv = torch.stack([_inv_freq(Dh), torch.zeros(Dh // 2)], dim=1)[:, 0].to(device)  # stride-2 inv_freq
    kw = dict(positions=pos.t().contiguous().t(), inv_freq=inv, mrope_section=(2, 3, 3),
              slots=torch.tensor([2, 0], device=device))
    q_t, kc_t, vc_t = _run("triton", q, k, v, kc, vc, **kw)
    q_r, kc_r, vc_r = _run("reference", q.contiguous(), k.contiguous(), v.contiguous(), kc, vc, **kw)
    torch.testing.assert_close(q_t, q_r, **TOL[torch.float32])
    torch.testing.assert_close(kc_t, kc_r, **TOL[torch.float32])
    torch.testing.assert_close(vc_t, vc_r, atol=0, rtol=0)


@pytest.mark.parametrize("device", triton_devices())
def test_kernel_drops_out_of_range_slots(device):
    # The op diagnoses slot >= L_max only on CPU or with check=True (it syncs); without
    # the check the GPU kernel must not write past the sample's rows. Call the launcher
    # directly (on the test's device) to see the in-kernel guard.
    from medlvr.ops.decode import _kernels

    B, Hq, Hkv, Dh, L = 2, 2, 1, 8, 3
    q, k, v, kc, vc, pos = _case(B, Hq, Hkv, Dh, L, torch.float32, B_max=3, device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    inv, bad_slots = _inv_freq(Dh).to(device), torch.tensor([L, 1], device=device)
    with medlvr.force_backend("triton"):
        with pytest.raises(ValueError, match="slots"):
            rotary_append(q, k, v, positions=pos, inv_freq=inv, k_cache=kc2, v_cache=vc2, slots=bad_slots,
                          check=True)  # CPU calls check without asking
        _kernels("rotary_append").rotary_append(q, k, v, positions=pos, inv_freq=inv, k_cache=kc2,
                                                v_cache=vc2, slots=bad_slots, rotary_dim=Dh)
    assert torch.equal(kc2[0], kc[0]) and torch.equal(kc2[2], kc[2]) and torch.equal(vc2[2], vc[2])
    assert not torch.equal(kc2[1], kc[1])
