"""decode_attention: split-K Triton kernel vs the masked-softmax reference vs SDPA.

Tolerances against the fp32 reference of the same (upcast) inputs: fp32 1e-5; bf16
2e-2 (softmax weights are rounded to bf16 for the P·V tensor-core dot, plus the output
rounding: a few bf16 ulps of O(1) values); fp16 4e-3 for the same reasons at 2^-11.
The same on CUDA: fp32 caches use IEEE dots there too (no TF32), and the interpreter
emulates the GPU's roundings.

Devices (tests/devices.py): Triton cases run on CPU tensors under the interpreter and on
CUDA tensors natively; reference cases on CPU and CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

import medlvr
from devices import backend_devices, triton_devices
from medlvr.engine.graphs import capture_graph
from medlvr.ops.decode import decode_attention
from medlvr.reference import decode as ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def _case(B, Hq, Hkv, Dh, L, dtype, lengths, *, B_max=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    B_max = B_max or B
    q = torch.randn(B, Hq, Dh, generator=g).to(dtype)
    kc = torch.randn(B_max, Hkv, L, Dh, generator=g).to(dtype)
    vc = torch.randn(B_max, Hkv, L, Dh, generator=g).to(dtype)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    # Stale data past each length and in unused rows must never be read: poison it.
    for b in range(B_max):
        n = int(lengths[b]) if b < B else 0
        kc[b, :, n:] = float("nan")
        vc[b, :, n:] = float("nan")
    return q.to(device), kc.to(device), vc.to(device), lengths.to(device)


def _run(backend, *args, **kw):
    with medlvr.force_backend(backend):
        return decode_attention(*args, **kw)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,Dh", [(2, 2, 16), (4, 2, 24), (7, 1, 40)])  # GQA groups 1, 2, 7
def test_kernel_matches_reference(dtype, Hq, Hkv, Dh, device):
    L = 70  # > one 64-key tile, not a multiple of it
    lengths = [0, 1, 37, L]  # inactive, first token only, ragged, full cache
    q, kc, vc, lens = _case(4, Hq, Hkv, Dh, L, dtype, lengths, B_max=5, device=device)
    want = ref.decode_attention(q.float(), kc.float(), vc.float(), lens)
    assert torch.isfinite(want).all() and torch.equal(want[0], torch.zeros_like(want[0]))
    for splits in (1, 3):
        got = _run("triton", q, kc, vc, lens, num_splits=splits)
        assert got.dtype == dtype and got.shape == q.shape
        assert torch.isfinite(got).all()
        assert torch.equal(got[0], torch.zeros_like(got[0]))  # length 0 -> exactly 0, never NaN
        torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("device", triton_devices())
def test_default_splits_and_empty_splits(device):
    # More splits than keys: most splits are empty for every sample and must merge to
    # weight 0; the default split count must give the same answer.
    q, kc, vc, lens = _case(2, 4, 2, 16, 9, torch.float32, [9, 2], device=device)
    want = ref.decode_attention(q, kc, vc, lens)
    for splits in (None, 12):
        torch.testing.assert_close(_run("triton", q, kc, vc, lens, num_splits=splits), want, **TOL[torch.float32])


@pytest.mark.parametrize("device", triton_devices())
def test_b1_scale_out_buffer_inference_mode(device):
    q, kc, vc, lens = _case(1, 2, 1, 16, 5, torch.float32, [4], device=device)
    out = torch.full_like(q, float("nan"))
    with torch.inference_mode():
        res = _run("triton", q, kc, vc, lens, scale=0.3, num_splits=2, out=out)
    assert res is out
    torch.testing.assert_close(out, ref.decode_attention(q, kc, vc, lens, scale=0.3), **TOL[torch.float32])


@pytest.mark.parametrize("backend,device", backend_devices())
def test_matches_sdpa(backend, device):
    B, Hq, Hkv, Dh, L = 3, 6, 2, 16, 12
    lengths = [5, 12, 1]
    q, kc, vc, lens = _case(B, Hq, Hkv, Dh, L, torch.float32, lengths, device=device)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # SDPA multiplies masked V by 0
    mask = torch.arange(L, device=device)[None, :] < lens[:, None]
    want = F.scaled_dot_product_attention(
        q[:, :, None, :], kc.repeat_interleave(Hq // Hkv, 1), vc.repeat_interleave(Hq // Hkv, 1),
        attn_mask=mask[:, None, None, :])[:, :, 0]
    torch.testing.assert_close(_run(backend, q, kc, vc, lens, num_splits=2), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ bad input
def _good():
    q, kc, vc, lens = _case(2, 4, 2, 16, 8, torch.float32, [3, 8])
    return dict(q=q, k_cache=kc, v_cache=vc, lengths=lens)


@pytest.mark.parametrize("patch,err,match", [
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple"),
    (lambda a: a.update(q=a["q"][..., :8]), ValueError, "k_cache"),
    (lambda a: a.update(q=torch.zeros(3, 4, 16)), ValueError, "k_cache"),
    (lambda a: a.update(v_cache=a["v_cache"].half()), TypeError, "v_cache"),
    (lambda a: a.update(k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half()), TypeError, "k_cache"),
    (lambda a: a.update(lengths=a["lengths"].float()), TypeError, "lengths"),
    (lambda a: a.update(lengths=a["lengths"][:1]), ValueError, "lengths"),
    (lambda a: a.update(lengths=torch.tensor([3, 9])), ValueError, "lengths"),
    (lambda a: a.update(lengths=torch.tensor([-1, 2])), ValueError, "lengths"),
    (lambda a: a.update(num_splits=0), ValueError, "num_splits"),
    (lambda a: a.update(out=torch.empty(2, 4, 16, dtype=torch.float16)), TypeError, "out"),
])
def test_bad_input(patch, err, match):
    a = _good()
    patch(a)
    with pytest.raises(err, match=match):
        decode_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("lengths"), **a)


@pytest.mark.cuda
@pytest.mark.parametrize("B,L", [(1, 1024), (8, 300), (32, 4096)])
def test_cuda_bf16_qwen_shapes(B, L):
    Hq, Hkv, Dh = 28, 4, 128
    g = torch.Generator().manual_seed(B)
    lengths = torch.randint(0, L + 1, (B,), generator=g).tolist()
    lengths[0] = L
    q, kc, vc, lens = [t.cuda() for t in _case(B, Hq, Hkv, Dh, L, torch.bfloat16, lengths)]
    want = ref.decode_attention(q.float(), kc.float(), vc.float(), lens)
    got = _run("triton", q, kc, vc, lens)
    torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


@pytest.mark.cuda
def test_cuda_graph_capture_all_three_ops():
    """One captured step (rotary+append, attention, norm feedback) replayed with new
    slots/lengths/positions equals eager reference calls: the ops are graph-safe."""
    from medlvr.ops.decode import rmsnorm_feedback, rotary_append

    dev = torch.device("cuda")
    B, Hq, Hkv, Dh, L = 4, 28, 4, 128, 256
    D = Hq * Dh
    dt = torch.bfloat16
    inv = (1.0 / (1e6 ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh))).to(dev)
    kc = torch.randn(B, Hkv, L, Dh, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    q, k, v = (torch.randn(B, h, Dh, device=dev, dtype=dt) for h in (Hq, Hkv, Hkv))
    hidden, w = torch.randn(B, D, device=dev, dtype=dt), torch.randn(D, device=dev, dtype=dt)
    pos = torch.zeros(3, B, dtype=torch.long, device=dev)
    slots = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    o_buf, e_buf = torch.empty_like(q), torch.zeros(B, D, device=dev, dtype=dt)

    def step():
        q_rot = rotary_append(q, k, v, positions=pos, inv_freq=inv, mrope_section=(16, 24, 24),
                              k_cache=kc, v_cache=vc, slots=slots)
        decode_attention(q_rot, kc, vc, (slots + 1).clamp(min=0), out=o_buf)
        rmsnorm_feedback(hidden, w, eps=1e-6, out=e_buf, active=active)

    graph, _ = capture_graph(step)  # its warm-up compiles the kernels outside the capture
    pos.copy_(torch.tensor([[10, 20, 30, 40], [11, 21, 31, 41], [12, 22, 32, 42]]))
    slots.copy_(torch.tensor([5, -1, 100, L - 1]))
    active.copy_(torch.tensor([True, False, True, True]))
    kc0, vc0, e0 = kc.clone(), vc.clone(), e_buf.clone()
    graph.replay()
    torch.cuda.synchronize()
    with medlvr.force_backend("reference"):
        kr, vr = kc0.clone(), vc0.clone()
        q_rot = rotary_append(q, k, v, positions=pos, inv_freq=inv, mrope_section=(16, 24, 24),
                              k_cache=kr, v_cache=vr, slots=slots)
        o_ref = decode_attention(q_rot, kr, vr, (slots + 1).clamp(min=0))
        e_ref = rmsnorm_feedback(hidden, w, eps=1e-6, out=e0.clone(), active=active)
    torch.testing.assert_close(kc.float(), kr.float(), atol=1e-5, rtol=8e-3)
    torch.testing.assert_close(o_buf.float(), o_ref.float(), **TOL[torch.bfloat16])
    torch.testing.assert_close(e_buf.float(), e_ref.float(), atol=1e-5, rtol=8e-3)


@pytest.mark.parametrize("device", triton_devices())
def test_kernel_clamps_lengths_to_the_cache(device):
    # Without check=True a GPU call does not validate lengths (it would sync); a length
    # past L_max must read no further than the sample's own L_max rows. The launcher is
    # called directly (on the test's device) to see the in-kernel clamp.
    from medlvr.ops.decode import _kernels

    q, kc, vc, _ = _case(2, 2, 1, 16, 6, torch.float32, [6, 6], B_max=3, device=device)
    kc[2], vc[2] = float("nan"), float("nan")  # the next sample's rows
    too_long = torch.tensor([6, 9], device=device)
    with medlvr.force_backend("triton"):
        with pytest.raises(ValueError, match="lengths"):
            decode_attention(q, kc, vc, too_long, check=True)  # CPU calls check without asking
        got = _kernels("decode_attention").decode_attention(q, kc, vc, too_long, num_splits=2)
    want = ref.decode_attention(q, kc, vc, torch.tensor([6, 6], device=device))
    torch.testing.assert_close(got, want, **TOL[torch.float32])
