"""gather_logprobs / latent_gaussian_logprob: fast paths against medlvr.reference.

Devices (tests/devices.py): the compiled extension on CPU tensors (C++) and, with a GPU
and a CUDA build, on CUDA tensors; the tolerances are the same on both.
"""
import pytest
import torch

import medlvr
from devices import kernel_devices
from medlvr import _backend
from medlvr.ops import gather_logprobs, latent_gaussian_logprob
from medlvr.reference.logprobs import gather_logprobs_ref, latent_gaussian_logprob_ref

requires_ext = pytest.mark.skipif(_backend.extension() is None, reason="medlvr._C was not built")

# Both paths are compared with the reference evaluated in fp64 on the same (rounded) logits.
# The fast path accumulates in fp32 for fp16/bf16/fp32 inputs, so log-probs and entropies
# agree to fp32 rounding (lse ~ 15 has an ulp of 1e-6); gradients are rounded once to the
# input dtype (bf16: 2^-8 relative), hence the looser bounds there. fp64 inputs are
# computed in fp64 end to end, 1/temperature included (fp64 rule, medlvr/ops/_checks.py):
# 1e-9, which an fp32 step anywhere misses (1/0.7 in fp32 alone is 2e-8 off).
LOGP_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(n, v, dtype, device, *, ignore_every=0, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    if ignore_every:
        targets[::ignore_every] = -100
    return logits, targets


def _ext_on(device):
    if device == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("medlvr._C was built without CUDA")


def _grads(logits, targets, *, backend, weights, ent_weights=None, **kw):
    if backend == "reference":  # the truth: fp64 on the very same values
        logits = logits.double()
    x = logits.detach().clone().requires_grad_(True)
    with medlvr.force_backend(backend):
        out = gather_logprobs(x, targets, return_entropy=ent_weights is not None, **kw)
    if ent_weights is not None:
        logp, ent = out
        (logp * weights).sum().add((ent * ent_weights).sum()).backward()
        return logp.detach(), ent.detach(), x.grad
    (out * weights).sum().backward()
    return out.detach(), None, x.grad


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,v", [(0, 7), (1, 1), (1, 5), (7, 1000), (3, 4099), (5, 2048 * 2 + 1), (2, 152064)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(device, dtype, n, v, temperature):
    _ext_on(device)
    logits, targets = _inputs(n, v, dtype, device, ignore_every=3 if n > 2 else 0)
    w = torch.randn(n, device=device)
    got, _, g_got = _grads(logits, targets, backend="ext", weights=w, temperature=temperature)
    ref, _, g_ref = _grads(logits, targets, backend="reference", weights=w, temperature=temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (n,)
    torch.testing.assert_close(got.double(), ref, rtol=LOGP_TOL[dtype], atol=LOGP_TOL[dtype])
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.double(), g_ref.double(), rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype])


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_entropy_and_its_gradient(device, dtype, temperature):
    _ext_on(device)
    logits, targets = _inputs(9, 3001, dtype, device, ignore_every=4)
    w, we = torch.randn(9, device=device), torch.randn(9, device=device)
    lp, ent, g = _grads(logits, targets, backend="ext", weights=w, ent_weights=we, temperature=temperature)
    lp_r, ent_r, g_r = _grads(logits, targets, backend="reference", weights=w, ent_weights=we,
                              temperature=temperature)
    torch.testing.assert_close(lp.double(), lp_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent_r, rtol=1e-5, atol=1e-5)
    assert (ent[::4] == 0).all(), "ignored rows have zero entropy"
    torch.testing.assert_close(g.double(), g_r.double(), rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype])


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_inplace_backward_gives_the_same_gradient_in_the_logits_buffer(device, dtype, with_entropy):
    _ext_on(device)
    logits, targets = _inputs(6, 2500, dtype, device, ignore_every=5)
    w = torch.randn(6, device=device)
    we = torch.randn(6, device=device) if with_entropy else None
    _, _, g_ref = _grads(logits, targets, backend="ext", weights=w, ent_weights=we)

    # A non-leaf logits buffer, as lm_head's output would be: the backward overwrites it and
    # hands the same storage on as the gradient.
    x = logits.detach().clone().requires_grad_(True)
    y = x * 1
    ptr = y.data_ptr()
    seen = []
    y.register_hook(seen.append)  # (retain_grad would clone)
    with medlvr.force_backend("ext"):
        out = gather_logprobs(y, targets, inplace_backward=True, return_entropy=with_entropy)
    loss = (out[0] * w).sum() + (out[1] * we).sum() if with_entropy else (out * w).sum()
    loss.backward()
    assert seen[0].data_ptr() == ptr, "the gradient must live in the logits buffer"
    torch.testing.assert_close(x.grad, g_ref, rtol=0, atol=0)


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
def test_strided_rows_are_read_in_place(device):
    _ext_on(device)
    wide, targets = _inputs(4, 300, torch.float32, device)
    view = wide[:, :257]  # row stride 300, V = 257
    targets = targets.clamp(max=256)
    with medlvr.force_backend("ext"):
        got = gather_logprobs(view, targets)
    torch.testing.assert_close(got, gather_logprobs_ref(view, targets), rtol=1e-5, atol=1e-5)


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
def test_gradcheck_fp64(device):
    _ext_on(device)
    logits, targets = _inputs(4, 13, torch.float64, device, ignore_every=3, scale=1.0)
    logits.requires_grad_(True)

    def f(x):
        with medlvr.force_backend("ext"):
            lp, ent = gather_logprobs(x, targets, temperature=0.8, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
def test_masked_logits_with_minus_inf_give_no_nan(device):
    _ext_on(device)
    logits, targets = _inputs(3, 600, torch.float32, device)
    logits[:, 100:] = float("-inf")
    targets = targets % 100
    with medlvr.force_backend("ext"):
        lp, ent = gather_logprobs(logits.requires_grad_(True), targets, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    ref_lp, ref_ent = gather_logprobs_ref(logits.detach(), targets, return_entropy=True)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, 100:] == 0).all()


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
def test_ops_pass_opcheck(device):
    """Schema, fake (meta) kernels and autograd registration are consistent (torch.compile-safe)."""
    _ext_on(device)
    logits, targets = _inputs(3, 50, torch.float32, device)
    lp, lse, ent = torch.ops.medlvr.logprobs_fwd(logits, targets, 1.0, -100, True)
    torch.library.opcheck(torch.ops.medlvr.logprobs_fwd.default, (logits, targets, 1.0, -100, True))
    g = torch.randn(3, device=device)
    torch.library.opcheck(torch.ops.medlvr.logprobs_bwd.default, (g, g, logits, targets, lse, ent, 1.0, -100))
    torch.library.opcheck(torch.ops.medlvr.logprobs_bwd_.default,
                          (g, None, logits.clone(), targets, lse, None, 1.0, -100))
    mu, z = torch.randn(4, 9, device=device), torch.randn(4, 9, device=device)
    torch.library.opcheck(torch.ops.medlvr.gaussian_logprob_fwd.default, (mu, z, 0.5))
    torch.library.opcheck(torch.ops.medlvr.gaussian_logprob_bwd.default,
                          (torch.randn(4, device=device), mu, z, 0.5, True, False))


@pytest.mark.parametrize("backend", ["reference", pytest.param("ext", marks=requires_ext)])
@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: gather_logprobs(torch.randn(3, 5, 2), torch.zeros(3, dtype=torch.long)), ValueError, "logits must be 2-D"),
        (lambda: gather_logprobs(torch.randn(3, 5), torch.zeros(4, dtype=torch.long)), ValueError, "N = 3"),
        (lambda: gather_logprobs(torch.randn(3, 5), torch.zeros(3)), TypeError, "targets must have dtype"),
        (lambda: gather_logprobs(torch.randn(3, 5).int(), torch.zeros(3, dtype=torch.long)), TypeError, "logits must have dtype"),
        (lambda: gather_logprobs(torch.randn(3, 5), torch.tensor([0, 5, 1])), ValueError, r"targets\[1\] = 5 is outside \[0, V = 5\)"),
        (lambda: gather_logprobs(torch.randn(3, 5), torch.tensor([0, -1, 1])), ValueError, r"targets\[1\] = -1"),
        (lambda: gather_logprobs(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (lambda: gather_logprobs(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), temperature=-1), ValueError, "temperature"),
        (lambda: gather_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long)), ValueError, "V > 0"),
        (lambda: gather_logprobs([[1.0]], torch.zeros(1, dtype=torch.long)), TypeError, "logits must be a torch.Tensor"),
        (lambda: gather_logprobs(torch.randn(5, 3).T, torch.zeros(3, dtype=torch.long), inplace_backward=True), ValueError, "contiguous rows"),
        (lambda: latent_gaussian_logprob(torch.randn(3, 4), torch.randn(3, 5), sigma=1.0), ValueError, "z must have the shape of mu"),
        (lambda: latent_gaussian_logprob(torch.randn(3, 4), torch.randn(3, 4).int(), sigma=1.0), TypeError, "z must have dtype"),
        (lambda: latent_gaussian_logprob(torch.randn(3, 4), torch.randn(3, 4), sigma=0), ValueError, "sigma must be"),
        (lambda: latent_gaussian_logprob(torch.randn(4), torch.randn(4), sigma=1.0), ValueError, "mu must be 2-D"),
    ],
)
def test_bad_input_is_rejected_before_any_kernel(backend, call, exc, match):
    with medlvr.force_backend(backend), pytest.raises(exc, match=match):
        call()


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("m,d", [(0, 8), (1, 1), (5, 37), (16, 3584)])
@pytest.mark.parametrize("z_grad", [False, True])
def test_latent_gaussian_matches_reference(device, dtype, m, d, z_grad):
    _ext_on(device)
    mu = torch.randn(m, d, device=device).to(dtype)
    z = (mu.float() + 0.3 * torch.randn(m, d, device=device)).to(dtype)
    w = torch.randn(m, device=device)
    outs = {}
    for backend in ("ext", "reference"):
        a = mu.clone().requires_grad_(True)
        b = z.clone().requires_grad_(z_grad)
        with medlvr.force_backend(backend):
            lp = latent_gaussian_logprob(a, b, sigma=0.7)
        (lp * w).sum().backward()
        outs[backend] = (lp.detach(), a.grad, b.grad)
    # fp64 on both sides: only the order of D additions differs (fp64 rule: no fp32 step)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(outs["ext"][0], outs["reference"][0], rtol=tol, atol=tol)
    torch.testing.assert_close(outs["ext"][1], outs["reference"][1], rtol=tol, atol=tol)
    if z_grad:
        torch.testing.assert_close(outs["ext"][2], outs["reference"][2], rtol=tol, atol=tol)
        torch.testing.assert_close(outs["ext"][2], -outs["ext"][1], rtol=0, atol=0)
    else:
        assert outs["ext"][2] is None


@requires_ext
@pytest.mark.parametrize("device", kernel_devices())
def test_latent_gaussian_gradcheck_and_value(device):
    _ext_on(device)
    mu = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    z = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    with medlvr.force_backend("ext"):
        assert torch.autograd.gradcheck(lambda a, b: latent_gaussian_logprob(a, b, sigma=0.5), (mu, z))
        got = latent_gaussian_logprob(mu, z, sigma=0.5)
    expected = -((z - mu) ** 2).sum(-1) / (2 * 0.25)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(latent_gaussian_logprob_ref(mu, z, sigma=0.5).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("mu_dtype,z_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.bfloat16), (torch.float32, torch.float64)])
def test_latent_gaussian_mixed_dtypes_under_autocast(device, backend, mu_dtype, z_dtype):
    # issue 10's contract: under bf16 autocast mu leaves the model bf16 while the rollout's
    # z is fp32. Mixed float dtypes are accepted and cast up exactly, so z - mu (~ sigma)
    # is never rounded to bf16; logp is fp32 (fp64 with an fp64 input), each gradient
    # comes back in its input's dtype.
    if backend == "ext":
        if _backend.extension() is None:
            pytest.skip("medlvr._C was not built")
        _ext_on(device)
    g = torch.Generator().manual_seed(0)
    mu = (torch.randn(6, 37, generator=g, dtype=torch.float64) * 3.0).to(mu_dtype).to(device)
    z = (mu.double() + 0.05 * torch.randn(6, 37, generator=g, dtype=torch.float64).to(device)).to(z_dtype)
    mu.requires_grad_(True)
    z.requires_grad_(True)
    with medlvr.force_backend(backend), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = latent_gaussian_logprob(mu, z, sigma=0.1)
    wide = torch.float64 if torch.float64 in (mu_dtype, z_dtype) else torch.float32
    assert got.dtype == wide
    weights = torch.linspace(-1, 1, 6, device=device, dtype=torch.float64)  # one set for both sides
    (got * weights).sum().backward()
    m64, z64 = mu.detach().double().requires_grad_(True), z.detach().double().requires_grad_(True)
    want = -((z64 - m64) ** 2).sum(-1) / (2 * 0.1 ** 2)
    (want * weights).sum().backward()
    tol = 1e-12 if wide == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    # the test can fail: rounding z to mu's dtype first (the old caller's workaround done
    # wrong) moves logp far beyond that tolerance when one input is bf16
    if torch.bfloat16 in (mu_dtype, z_dtype):
        rounded = -((z.detach().to(torch.bfloat16).double() - mu.detach().to(torch.bfloat16).double()) ** 2
                    ).sum(-1) / (2 * 0.1 ** 2)
        assert not torch.allclose(rounded, want.detach(), rtol=tol, atol=tol)
    for x, w in ((mu, m64), (z, z64)):
        assert x.grad.dtype == x.dtype
        # one rounding to the input's dtype
        gt = {torch.float64: 1e-12, torch.float32: 1e-5}.get(x.dtype, 1e-2)
        torch.testing.assert_close(x.grad.double(), w.grad, rtol=gt, atol=gt * w.grad.abs().max().item())
