"""The fp64 rule (medlvr/ops/_checks.py), the same for every op and every device: fp64 is
computed in fp64 end to end.

Each op is called with fp64 inputs and no forced backend (CPU: the C++ extension or the
reference; CUDA: the CUDA extension, or the reference for ops whose fast path is Triton)
and compared with the op's formula written out in fp64. The tolerances are far below
what one fp32 step anywhere would give (noted per op), so a path that computes fp64 in
fp32 fails here. Forcing the fp32 Triton kernels on an fp64 input is a TypeError naming
the argument, raised before anything is written.
"""
import pytest
import torch
import torchvision

import medlvr
from devices import kernel_devices
from medlvr.ops import gather_logprobs, latent_gaussian_logprob, prepare_roi_geometry, roi_align_loss
from medlvr.ops.decode import decode_attention, rmsnorm_feedback, rotary_append

F64 = torch.float64


def _randn(*shape, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device)


@pytest.mark.parametrize("device", kernel_devices())
def test_gather_logprobs_fp64(device):
    # 1/0.7 rounded to fp32 alone moves log-probs of size ~20 by ~5e-7: tolerance 1e-11.
    logits = _randn(7, 1001, scale=4.0, device=device).requires_grad_(True)
    targets = torch.tensor([0, 5, -100, 1000, 17, 3, 999], device=device)
    w = _randn(7, seed=1, device=device)
    logp, ent = gather_logprobs(logits, targets, temperature=0.7, return_entropy=True)
    assert logp.dtype == F64 and ent.dtype == F64
    (logp * w + ent).sum().backward()

    x = logits.detach().clone().requires_grad_(True)
    all_lp = torch.log_softmax(x / 0.7, dim=-1)
    keep = targets != -100
    want_lp = torch.where(keep, all_lp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    want_ent = torch.where(keep, -(all_lp.exp() * all_lp).sum(-1), 0.0)
    (want_lp * w + want_ent).sum().backward()
    for got, want in ((logp, want_lp), (ent, want_ent), (logits.grad, x.grad)):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("device", kernel_devices())
def test_latent_gaussian_logprob_fp64(device):
    # ||z - mu||^2 ~ 37 * 0.09 summed in fp32 would be ~1e-7 relative off: tolerance 1e-12.
    mu = _randn(5, 37, device=device).requires_grad_(True)
    z = (mu.detach() + 0.3 * _randn(5, 37, seed=1, device=device)).requires_grad_(True)
    got = latent_gaussian_logprob(mu, z, sigma=0.7)
    assert got.dtype == F64
    got.sum().backward()
    m2, z2 = mu.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
    want = -((z2 - m2) ** 2).sum(-1) / (2 * 0.7 ** 2)
    want.sum().backward()
    for a, b in ((got, want), (mu.grad, m2.grad), (z.grad, z2.grad)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def _rotary_case(device):
    B, Hq, Hkv, Dh, L = 3, 4, 2, 16, 5
    q, k, v = (_randn(B, h, Dh, seed=s, device=device) for s, h in ((0, Hq), (1, Hkv), (2, Hkv)))
    kc, vc = _randn(B, Hkv, L, Dh, seed=3, device=device), _randn(B, Hkv, L, Dh, seed=4, device=device)
    # positions up to 5000: an fp32 angle there is off by up to 2.4e-4 rad
    positions = torch.tensor([4999, 7, 2345], device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, Dh, 2, dtype=F64, device=device) / Dh))
    slots = torch.tensor([0, 4, 2], device=device)
    return dict(q=q, k=k, v=v, k_cache=kc, v_cache=vc, positions=positions, inv_freq=inv_freq, slots=slots)


def _rope64(x, positions, inv_freq):
    ang = positions.to(F64)[:, None] * inv_freq  # (B, Dh/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("device", kernel_devices())
def test_rotary_append_fp64(device):
    a = _rotary_case(device)
    kc0 = a["k_cache"].clone()
    q_rot = rotary_append(a.pop("q"), a.pop("k"), a.pop("v"), **a)
    c = _rotary_case(device)
    assert q_rot.dtype == F64
    torch.testing.assert_close(q_rot, _rope64(c["q"], c["positions"], c["inv_freq"]), rtol=1e-10, atol=1e-10)
    want_kc = kc0.clone()
    want_kc[torch.arange(3, device=device), :, c["slots"]] = _rope64(c["k"], c["positions"], c["inv_freq"])
    torch.testing.assert_close(a["k_cache"], want_kc, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", kernel_devices())
def test_decode_attention_fp64(device):
    # softmax weights in fp32 would be ~1e-7 relative off: tolerance 1e-12.
    B, Hq, Hkv, Dh, L = 2, 4, 2, 8, 9
    q = _randn(B, Hq, Dh, scale=2.0, device=device)
    kc, vc = _randn(B, Hkv, L, Dh, seed=1, device=device), _randn(B, Hkv, L, Dh, seed=2, device=device)
    lengths = torch.tensor([9, 4], device=device)
    got = decode_attention(q, kc, vc, lengths)
    assert got.dtype == F64
    for b in range(B):
        n = int(lengths[b])
        k = kc[b, :, :n].repeat_interleave(Hq // Hkv, 0)  # (Hq, n, Dh)
        v = vc[b, :, :n].repeat_interleave(Hq // Hkv, 0)
        p = torch.softmax((k @ q[b, :, :, None])[..., 0] * Dh ** -0.5, dim=-1)  # (Hq, n)
        torch.testing.assert_close(got[b], (p[:, :, None] * v).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", kernel_devices())
def test_rmsnorm_feedback_fp64(device):
    # an fp32 statistic (HF's convention for every dtype) is ~1e-7 relative off: 1e-12.
    hidden, weight = _randn(3, 40, scale=3.0, device=device), _randn(40, seed=1, device=device)
    out = torch.full((3, 40), float("nan"), dtype=F64, device=device)
    rmsnorm_feedback(hidden, weight, eps=1e-6, out=out)
    want = weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# Two images of 3×5 and 2×2 merged tokens (28 px each); boxes inside their image (torchvision
# does not clip), bin edges on whole pixels (the pixel-level area formula below needs it)
_ROI_GRID = torch.tensor([[1, 6, 10], [1, 4, 4]])
_ROI_BOXES = torch.tensor([[6.0, 12.0, 126.0, 72.0], [2.0, 0.0, 56.0, 56.0], [27.0, 27.0, 30.0, 33.0]], dtype=F64)
_ROI_IMAGE = torch.tensor([0, 1, 0])
_ROI_BINS = (2, 3)


def _roi_targets64(v, pooling):
    """(R, K, D) targets written out in fp64: area = the plain mean over the bin's pixels
    of the token map upsampled to pixels; bilinear = torchvision's roi_align (aligned=True)
    run in fp64."""
    shapes, offsets = [(3, 5), (2, 2)], [0, 15]
    out = []
    for r, box in enumerate(_ROI_BOXES.tolist()):
        b = int(_ROI_IMAGE[r])
        (h, w), o = shapes[b], offsets[b]
        tokens = v[o: o + h * w].view(h, w, -1)
        if pooling == "bilinear":
            fmap = tokens.permute(2, 0, 1)[None]
            t = torchvision.ops.roi_align(fmap, [torch.tensor([box], dtype=F64, device=v.device)], _ROI_BINS,
                                          spatial_scale=1 / 28, sampling_ratio=2, aligned=True)
            out.append(t[0].flatten(1).T)
            continue
        x0, y0, x1, y1 = (int(c) for c in box)
        pix = tokens.repeat_interleave(28, 0).repeat_interleave(28, 1)
        bh, bw = (y1 - y0) // _ROI_BINS[0], (x1 - x0) // _ROI_BINS[1]
        out.append(torch.stack([pix[y0 + p * bh: y0 + (p + 1) * bh, x0 + q * bw: x0 + (q + 1) * bw].mean((0, 1))
                                for p in range(_ROI_BINS[0]) for q in range(_ROI_BINS[1])]))
    return torch.stack(out)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("pooling", ["area", "bilinear"])
@pytest.mark.parametrize("fp64_arg", ["both", "latents", "vision_tokens"])
def test_roi_align_loss_fp64(device, pooling, fp64_arg):
    # bin weights such as 22/40 px, clipped boxes and targets in fp32 are ~1e-7 relative
    # off: tolerance 1e-12 (an fp64 input makes the call fp64, boxes and weights included)
    z = _randn(3, 6, 24, device=device)
    v = _randn(19, 24, seed=1, device=device)
    if fp64_arg == "latents":
        v = v.float()
    elif fp64_arg == "vision_tokens":
        z = z.float()
    z.requires_grad_(True)
    v.requires_grad_(True)
    geometry = prepare_roi_geometry(_ROI_GRID, _ROI_BOXES, _ROI_IMAGE, bins=_ROI_BINS).to(device)
    got = roi_align_loss(z, v, geometry=geometry, pooling=pooling, detach_target=False)
    assert got.dtype == F64
    w = torch.autograd.grad(got, (z, v))
    z64, v64 = z.detach().double().requires_grad_(True), v.detach().double().requires_grad_(True)
    t = _roi_targets64(v64, pooling)
    want = (1.0 - (z64 * t).sum(-1) / (z64.norm(dim=-1) * t.norm(dim=-1))).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, x, x64 in zip(w, (z, v), (z64, v64)):
        assert g.dtype == x.dtype
        tol = 1e-12 if x.dtype == F64 else 1e-6  # an fp32 input's gradient: one rounding to fp32
        torch.testing.assert_close(g, torch.autograd.grad(want, x64, retain_graph=True)[0].to(x.dtype),
                                   rtol=tol, atol=tol)


# ------------------------------------------------------------------ forced Triton refuses fp64
def _rotary_forced(device, fp64_arg):
    a = _rotary_case(device)
    f32 = {k: (t.float() if t.is_floating_point() else t) for k, t in a.items()}
    if fp64_arg == "q":  # q, k, v share one dtype
        f32.update(q=a["q"], k=a["k"], v=a["v"])
    else:
        f32[fp64_arg] = a[fp64_arg]
    return lambda: rotary_append(f32.pop("q"), f32.pop("k"), f32.pop("v"), **f32), [f32["k_cache"], f32["v_cache"]]


def _attention_forced(device, fp64_arg):  # q and the caches share one dtype: all fp64
    q = _randn(2, 4, 8, device=device)
    kc, vc = _randn(2, 2, 6, 8, seed=1, device=device), _randn(2, 2, 6, 8, seed=2, device=device)
    out = torch.full_like(q, float("nan"))
    return lambda: decode_attention(q, kc, vc, torch.tensor([6, 3], device=device), out=out), [out]


def _rmsnorm_forced(device, fp64_arg):
    t = dict(hidden=_randn(2, 16, device=device).float(), weight=_randn(16, seed=1, device=device).float(),
             out=torch.full((2, 16), float("nan"), device=device))
    t[fp64_arg] = t[fp64_arg].double()
    return lambda: rmsnorm_feedback(t["hidden"], t["weight"], eps=1e-6, out=t["out"]), [t["out"]]


def _roi_forced(device, fp64_arg):
    geometry = prepare_roi_geometry(_ROI_GRID, _ROI_BOXES.float(), _ROI_IMAGE, bins=_ROI_BINS).to(device)
    t = dict(latents=_randn(3, 6, 8, device=device).float(), vision_tokens=_randn(19, 8, seed=1, device=device).float())
    t[fp64_arg] = t[fp64_arg].double()
    return lambda: roi_align_loss(t["latents"], t["vision_tokens"], geometry=geometry), [geometry.buffer]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("op,fp64_arg", [
    ("rotary_append", "q"), ("rotary_append", "k_cache"), ("rotary_append", "inv_freq"),
    ("decode_attention", "q"),
    ("rmsnorm_feedback", "hidden"), ("rmsnorm_feedback", "weight"), ("rmsnorm_feedback", "out"),
    ("roi_align_loss", "latents"), ("roi_align_loss", "vision_tokens"),
])
def test_forced_triton_refuses_fp64_naming_the_argument(op, fp64_arg, device):
    # No kernel runs, so CPU cases need no interpreter: the refusal comes first.
    make = {"rotary_append": _rotary_forced, "decode_attention": _attention_forced,
            "rmsnorm_feedback": _rmsnorm_forced, "roi_align_loss": _roi_forced}[op]
    call, written = make(device, fp64_arg)
    before = [t.clone() for t in written]
    with medlvr.force_backend("triton"), pytest.raises(TypeError, match=rf"^{op}: {fp64_arg} has dtype float64"):
        call()
    for t, t0 in zip(written, before):
        assert torch.equal(t.nan_to_num(7.0), t0.nan_to_num(7.0)), "nothing may be written before the error"
