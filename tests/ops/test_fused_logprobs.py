"""fused_linear_logprobs / fused_vlpo_loss against the unfused reference (medlvr/reference/fused_logprobs.py).

The truth is the reference evaluated in fp64 on the very same (rounded) inputs. The fast path
rounds the logits to the compute dtype (as the model's lm_head would) and the gradients once
more, so errors are bounded relative to the largest value of the compared tensor:
fp32 1e-5, bf16 / fp16 inputs 4e-2 / 1e-2 (logits and d logits carry one 16-bit rounding each),
with 1 as the smallest scale (log-probs and gradients here are O(1)).
"""
import sys
from pathlib import Path

import pytest
import torch

import medlvr
from medlvr import _backend
from medlvr.ops import fused_linear_logprobs, fused_vlpo_loss, lm_head_logprobs
from medlvr.ops import _fused_logprobs_sweep as sweep
from medlvr.ops.logprobs import gather_logprobs
from medlvr.reference.fused_logprobs import fused_linear_logprobs_ref, fused_vlpo_loss_ref
from medlvr.ops.vlpo_loss import vlpo_loss

requires_ext = pytest.mark.skipif(_backend.extension() is None, reason="medlvr._C was not built")
pytestmark = [requires_ext, pytest.mark.usefixtures("one_torch_thread")]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 1e-2}


def _err(got, want):
    """max |got - want| relative to max(max |want|, 1)."""
    if not want.numel():
        return 0.0
    got, want = got.detach().double(), want.detach().double()
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)


def _close(got, want, tol, what=""):
    err = _err(got, want)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (relative to max(max |want|, 1))"


def _ext(device):
    if device == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("medlvr._C was built without CUDA")


def _linear(n, v, d, dtype, device, *, bias=False, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5 * 3).to(dtype).to(device)
    b = (torch.randn(v, generator=g, dtype=torch.float64)).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(device)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, b, t


def _run(fn, h, w, b, t, gw, ge=None, **kw):
    """Forward + backward of sum(gw * logp [+ ge * entropy]) -> (logp, entropy, d h, d w, d b)."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]
    out = fn(leaves[0], leaves[1], t, bias=leaves[2], return_entropy=ge is not None, **kw)
    lp, ent = out if ge is not None else (out, None)
    loss = (lp * gw).sum() + ((ent * ge).sum() if ge is not None else 0)
    loss.backward()
    return lp.detach(), ent, *[None if x is None else x.grad for x in leaves]


# ------------------------------------------------------------------------ log-probs ---
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v,d,chunk", [(0, 7, 4, None), (1, 1, 3, None), (7, 1000, 16, 3), (13, 4099, 8, 5),
                                         (5, 2 * 2048 + 1, 12, 2), (33, 257, 24, None)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_grads_match_reference(device, dtype, n, v, d, chunk, temperature):
    """V is never a multiple of the log-prob kernel's 2048-column chunk or its vector width;
    N is not a multiple of the row chunk; every third row is ignored."""
    _ext(device)
    h, w, b, t = _linear(n, v, d, dtype, device, bias=(v % 2 == 1), ignore_every=3 if n > 3 else 0)
    gw = torch.randn(n, device=device)
    ge = torch.randn(n, device=device)
    got = _run(fused_linear_logprobs, h, w, b, t, gw, ge, temperature=temperature, chunk_size=chunk)
    want = _run(fused_linear_logprobs_ref, *(None if x is None else x.double() for x in (h, w, b)), t, gw, ge,
                temperature=temperature)
    assert got[0].dtype == torch.float32 and got[0].shape == (n,)
    for name, a, e in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), got, want):
        if e is not None:
            _close(a, e, TOL[dtype], name)
    if dtype in (torch.float16, torch.bfloat16) and n:
        # ... and as close as the unfused path in the same dtype (same rounding points), up to
        # the per-chunk rounding of the accumulated d weight / d bias.
        same = _run(fused_linear_logprobs_ref, h, w, b, t, gw, ge, temperature=temperature)
        for name, a, u, e in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), got, same, want):
            if e is not None:
                _close(a, e, 1.5 * _err(u, e) + 1e-5, name + " vs unfused " + str(dtype))
    assert got[2].dtype == dtype and got[3].dtype == dtype
    if n > 3:
        assert (got[0][::3] == 0).all() and (got[2][::3] == 0).all(), "ignored rows: logp 0, no gradient"


def test_fp64_gradcheck_with_bias_entropy_and_temperature():
    h, w, b, t = _linear(5, 11, 3, torch.float64, "cpu", bias=True, ignore_every=4)

    def f(h, w, b):
        return fused_linear_logprobs(h, w, t, bias=b, temperature=0.8, return_entropy=True, chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(x.requires_grad_(True) for x in (h, w, b)), eps=1e-6, atol=1e-7)


def test_backend_reference_is_the_unfused_path():
    h, w, b, t = _linear(6, 50, 8, torch.float32, "cpu", bias=True)
    with medlvr.force_backend("reference"):
        got = fused_linear_logprobs(h, w, t, bias=b)
    torch.testing.assert_close(got, fused_linear_logprobs_ref(h, w, t, bias=b), rtol=0, atol=0)


@pytest.mark.parametrize("hdtype", [torch.bfloat16, torch.float32])
def test_bf16_autocast_with_fp32_master_weight(hdtype):
    """Under autocast the GEMMs run in bf16 as F.linear would; grads come back in each
    input's dtype (hidden bf16 or fp32, weight fp32), the log-probs in fp32."""
    h, w, b, t = _linear(9, 301, 16, torch.float32, "cpu", ignore_every=4)
    h = h.to(hdtype)
    gw = torch.randn(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(fused_linear_logprobs, h, w, None, t, gw, chunk_size=4)
        want = _run(fused_linear_logprobs_ref, h, w, None, t, gw)
    assert got[0].dtype == torch.float32 and got[2].dtype == hdtype and got[3].dtype == torch.float32
    for name, a, e in zip(("logp", "d hidden", "d weight"), (got[0], got[2], got[3]), (want[0], want[2], want[3])):
        _close(a, e, 2e-2, name)
    # Outside autocast, fp32 beside bf16 runs in bf16 too (the dtype contract).
    lp = fused_linear_logprobs(h.bfloat16(), w, t)
    _close(lp, fused_linear_logprobs_ref(h.bfloat16(), w.bfloat16(), t), 1e-5, "mixed without autocast")


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_weight_gradient_from_16bit_gemms_goes_through_v_slices(device, monkeypatch):
    """Autocast over an fp32 weight: d W is accumulated in fp32 from bf16 products computed a
    slice of V at a time (here 7 rows, V = 301: 43 slices, the last one short), never as a
    (V, D) temporary; the result equals the unsliced one up to bf16 rounding."""
    _ext(device)
    h, w, _, t = _linear(9, 301, 16, torch.float32, device, ignore_every=4)
    gw = torch.randn(9, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        whole = _run(fused_linear_logprobs, h, w, None, t, gw, chunk_size=4)
        monkeypatch.setattr(sweep, "_DW_SLICE_BYTES", 7 * 16 * 2)
        sliced = _run(fused_linear_logprobs, h, w, None, t, gw, chunk_size=4)
        want = _run(fused_linear_logprobs_ref, h, w, None, t, gw)
    assert sliced[3].dtype == torch.float32
    torch.testing.assert_close(sliced[3], whole[3], rtol=1e-6, atol=1e-6)
    _close(sliced[3], want[3], 2e-2, "d weight")


def test_backward_is_deterministic():
    h, w, b, t = _linear(23, 999, 16, torch.float32, "cpu", bias=True)
    gw = torch.randn(23)
    a = _run(fused_linear_logprobs, h, w, b, t, gw, chunk_size=4)
    c = _run(fused_linear_logprobs, h, w, b, t, gw, chunk_size=4)
    for x, y in zip(a[2:], c[2:]):
        assert torch.equal(x, y)


def test_never_holds_the_full_logits():
    """Peak memory of forward + backward, not counting the returned gradients (the allocator's
    timeline, benchmarks/_common.py), is one (chunk, V) buffer plus O(N), far below the (N, V)
    logits."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks._common import peak_beyond_outputs

    n, v, d, chunk = 256, 4000, 16, 16
    h, w, _, t = _linear(n, v, d, torch.float32, "cpu")
    h.requires_grad_(True)
    w.requires_grad_(True)
    _, beyond = peak_beyond_outputs(lambda: torch.autograd.grad(
        fused_linear_logprobs(h, w, t, chunk_size=chunk).sum(), (h, w)), device=torch.device("cpu"))
    assert beyond < chunk * v * 4 + 64 * 1024, f"{beyond} bytes beyond the gradients"
    # the unfused path holds (N, V) logits at least once
    _, unfused = peak_beyond_outputs(lambda: torch.autograd.grad(
        fused_linear_logprobs_ref(h, w, t).sum(), (h, w)), device=torch.device("cpu"))
    assert unfused >= n * v * 4


def test_registered_ops_pass_opcheck():
    h, w, b, t = _linear(6, 37, 5, torch.float32, "cpu", bias=True, ignore_every=4)
    for bias, ent in ((None, False), (b, True)):
        args = (h, w, bias, t, 1.25, -100, ent, 4, torch.float32)
        torch.library.opcheck(torch.ops.medlvr.fused_logprobs_fwd.default, args)
        lp, lse, e = torch.ops.medlvr.fused_logprobs_fwd(*args)
        g = torch.randn(6)
        for need in ((True, True, bias is not None), (True, False, False), (False, True, False)):
            torch.library.opcheck(torch.ops.medlvr.fused_logprobs_bwd.default,
                                  (g, g if ent else None, h, w, bias, t, lse, e, 1.25, -100, 4, torch.float32, *need))
    # mixed dtypes: the op casts to the compute dtype and returns each gradient in its input's dtype
    lp, lse, e = torch.ops.medlvr.fused_logprobs_fwd(h.bfloat16(), w, None, t, 1.0, -100, False, 4, torch.bfloat16)
    torch.library.opcheck(torch.ops.medlvr.fused_logprobs_bwd.default,
                          (torch.randn(6), None, h.bfloat16(), w, None, t, lse, e, 1.0, -100, 4, torch.bfloat16,
                           True, True, False))


def test_torch_compile_traces_the_registered_ops_in_one_graph():
    h, w, _, t = _linear(9, 301, 16, torch.float32, "cpu", ignore_every=4)
    gw = torch.randn(9)
    f = torch.compile(lambda h, w: (fused_linear_logprobs(h, w, t, temperature=0.8, chunk_size=4) * gw).sum(),
                      fullgraph=True, backend="aot_eager")
    got = [x.detach().clone().requires_grad_(True) for x in (h, w)]
    f(*got).backward()
    want = _run(fused_linear_logprobs, h, w, None, t, gw, temperature=0.8, chunk_size=4)
    torch.testing.assert_close(got[0].grad, want[2], rtol=0, atol=0)
    torch.testing.assert_close(got[1].grad, want[3], rtol=0, atol=0)


def test_lm_head_logprobs_fuses_a_linear_and_honours_other_modules():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 300, bias=True)
    h, t = torch.randn(5, 8), torch.randint(0, 300, (5,))
    want = gather_logprobs(head(h), t, temperature=0.9)
    torch.testing.assert_close(lm_head_logprobs(head, h, t, temperature=0.9), want, rtol=1e-5, atol=1e-5)
    scaled = torch.nn.Sequential(head, torch.nn.Hardtanh(-0.1, 0.1))  # not a plain Linear: its forward runs
    torch.testing.assert_close(lm_head_logprobs(scaled, h, t), gather_logprobs(scaled(h), t), rtol=0, atol=0)


# ------------------------------------------------------------------------- VLPO loss ---
def _vlpo_inputs(dtype, device, *, R=3, T=7, K=2, D=16, V=1001, seed=1, bias=False):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h, w, b, _ = _linear(R * T, V, D, dtype, device, bias=bias, seed=seed)
    mask = torch.rand(R, T, generator=g) > 0.3
    mask[0, :] = True
    tokens = torch.randint(0, V, (R, T), generator=g)
    # Old and reference log-probs near the current ones (log-ratios ~ N(0, 0.3^2) and N(0, 0.5^2)),
    # as in training: some ratios clipped, none astronomically far (k3's e^d would overflow fp16).
    lp = fused_linear_logprobs_ref(h.double().cpu(), w.double().cpu(), tokens.flatten(), temperature=0.8,
                                   bias=None if b is None else b.double().cpu()).view(R, T).float()
    x = dict(hidden=h.view(R, T, D), weight=w, tokens=tokens,
             token_mask=mask, token_old=lp + 0.3 * f(R, T).float(), advantages=f(R).float())
    kw = dict(latent_old=f(R, K).float() - 0.5, mu=f(R, K, D).to(dtype), latent_sigma=0.7, eps_low=0.2,
              eps_high=0.28, dual_clip=3.0, latent_coef=0.3, kl_beta=0.05, token_ref=lp + 0.5 * f(R, T).float(),
              mu_ref=f(R, K, D).to(dtype), latent_scale=0.6, temperature=0.8, bias=b)
    kw["z"] = (kw["mu"].double() + 0.2 * f(R, K, D)).to(dtype)
    x = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return x, kw


def _vlpo_run(fn, x, kw, *, fp64=False, **extra):
    cast = (lambda t: t.double()) if fp64 else (lambda t: t)  # noqa: E731
    leaves = {k: cast(v).detach().clone().requires_grad_(True)
              for k, v in (("hidden", x["hidden"]), ("weight", x["weight"]), ("mu", kw["mu"]), ("bias", kw["bias"]))
              if v is not None}
    x = {**x, "hidden": leaves["hidden"], "weight": leaves["weight"]}
    kw = {**kw, "mu": leaves.get("mu"), "z": None if kw["z"] is None else cast(kw["z"]), "bias": leaves.get("bias"),
          "mu_ref": None if kw.get("mu_ref") is None else cast(kw["mu_ref"]), **extra}
    loss, tok, lat = fn(*x.values(), **kw)
    loss.backward()
    return {"loss": loss.detach(), "token_logp": tok, "latent_logp": lat,
            **{"d " + k: v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk,bias", [(None, False), (4, True)])
def test_vlpo_loss_matches_unfused_vlpo_loss(device, dtype, chunk, bias):
    _ext(device)
    x, kw = _vlpo_inputs(dtype, device, bias=bias)
    got = _vlpo_run(fused_vlpo_loss, x, kw, chunk_size=chunk)
    want = _vlpo_run(fused_vlpo_loss_ref, x, kw, fp64=True)
    assert got["loss"].dtype == torch.float32 and got["loss"].dim() == 0
    assert set(got) == set(want)
    for k in want:
        _close(got[k], want[k], TOL[dtype], k)
    assert got["d hidden"].dtype == dtype and got["d weight"].dtype == dtype


def test_vlpo_clip_boundaries_and_dual_clip_take_vlpo_loss_branches():
    """Ratios exactly at 1 + eps_high and 1 - eps_low, and dual-clipped rows with negative
    advantages: the fused gradient equals the one vlpo_loss gives at the same log-probs."""
    x, kw = _vlpo_inputs(torch.float32, "cpu", R=4, T=5, V=613)
    kw.update(mu=None, z=None, kl_beta=0.0, token_ref=None, mu_ref=None, latent_coef=0.0)
    x["token_mask"][:] = True
    x["advantages"] = torch.tensor([1.0, 1.0, -1.5, -0.5])
    # The fused op's own log-probs (same chunks, same GEMMs, bit-exact) place the ratios.
    lp = fused_linear_logprobs(x["hidden"].reshape(-1, 16), x["weight"], x["tokens"].reshape(-1), chunk_size=3,
                               temperature=kw["temperature"]).view(4, 5)
    shift = torch.tensor([[0.25, -0.25, 0.1, 0.0, 0.5], [0.3, -0.3, 0.2, 0.05, 0.0],
                          [2.0, 1.5, 0.3, -0.1, 0.0], [3.0, 0.2, -0.4, 0.0, 0.9]])
    x["token_old"] = lp - shift
    ratio = torch.exp((lp - x["token_old"]).clamp(-20, 20))  # as ppo_clip_loss computes it
    eps_high, eps_low = ratio[0, 0].item() - 1.0, 1.0 - ratio[0, 1].item()
    assert 1.0 + eps_high == ratio[0, 0].item() and 1.0 - eps_low == ratio[0, 1].item()
    kw.update(eps_low=eps_low, eps_high=eps_high)

    got = _vlpo_run(fused_vlpo_loss, x, kw, chunk_size=3)
    torch.testing.assert_close(got["token_logp"], lp, rtol=0, atol=0)
    # Reference: vlpo_loss's own per-token gradient at these log-probs, pushed through the
    # unfused lm_head in fp64.
    leaf = lp.clone().requires_grad_(True)
    loss, stats = vlpo_loss(token_logp=leaf, token_old=x["token_old"], token_mask=x["token_mask"],
                            latent_logp=torch.zeros(4, 2), latent_old=torch.zeros(4, 2), advantages=x["advantages"],
                            eps_low=eps_low, eps_high=eps_high, dual_clip=3.0, latent_coef=0.0)
    (g,) = torch.autograd.grad(loss, leaf)
    assert g[0, 0] != 0 and g[0, 1] != 0, "at exactly 1 +- eps the ratio is not clipped yet"
    assert (g[2, :2] == 0).all() and (g[3, 0] == 0), "dual clip: ratio > c with A < 0 has no gradient"
    assert g[3, 4] != 0, "dual clip leaves a negative-advantage row below c alone"
    h = x["hidden"].double().reshape(-1, 16).requires_grad_(True)
    w = x["weight"].double().requires_grad_(True)
    ref = fused_linear_logprobs_ref(h, w, x["tokens"].reshape(-1), temperature=kw["temperature"])
    (ref * g.reshape(-1).double()).sum().backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
    _close(got["d hidden"].reshape(-1, 16), h.grad, 1e-5, "d hidden")
    _close(got["d weight"], w.grad, 1e-5, "d weight")


@pytest.mark.parametrize("impl", [fused_vlpo_loss, fused_vlpo_loss_ref])
def test_old_none_is_on_policy(impl):
    """token_old / latent_old None = the log-probs computed in the call, detached: the same
    loss and gradients as passing them in (PPO's first epoch, ratio 1), in one pass."""
    x, kw = _vlpo_inputs(torch.float32, "cpu", bias=True)
    first = _vlpo_run(impl, x, kw, chunk_size=4) if impl is fused_vlpo_loss else _vlpo_run(impl, x, kw)
    extra = {"chunk_size": 4} if impl is fused_vlpo_loss else {}
    passed = _vlpo_run(impl, {**x, "token_old": first["token_logp"].detach()},
                       {**kw, "latent_old": first["latent_logp"].detach()}, **extra)
    on_policy = _vlpo_run(impl, {**x, "token_old": None}, {**kw, "latent_old": None}, **extra)
    for k in passed:
        torch.testing.assert_close(on_policy[k], passed[k], rtol=1e-6, atol=1e-7, msg=k)
    # K comes from mu; without mu there is no latent position at all
    none = _vlpo_run(impl, {**x, "token_old": None}, {**kw, "latent_old": None, "mu": None, "z": None,
                                                      "mu_ref": None, "kl_beta": 0.0}, **extra)
    assert none["latent_logp"].shape == (3, 0)


def test_kl_term_is_zero_at_the_reference():
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    base = _vlpo_run(fused_vlpo_loss, x, {**kw, "kl_beta": 0.0})
    kw.update(kl_beta=0.5, token_ref=base["token_logp"], mu_ref=kw["mu"].detach().clone())
    at_ref = _vlpo_run(fused_vlpo_loss, x, kw)
    for k in base:
        torch.testing.assert_close(at_ref[k], base[k], rtol=1e-6, atol=1e-7, msg=k)


def test_vlpo_backward_is_deterministic_and_scales_with_the_upstream_gradient():
    x, kw = _vlpo_inputs(torch.float32, "cpu", bias=True)
    a = _vlpo_run(fused_vlpo_loss, x, kw, chunk_size=4)
    b = _vlpo_run(fused_vlpo_loss, x, kw, chunk_size=4)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    h = x["hidden"].detach().clone().requires_grad_(True)
    loss, _, _ = fused_vlpo_loss(h, x["weight"], *list(x.values())[2:], **{**kw, "mu": None, "z": None})
    (2.5 * loss).backward()
    h2 = x["hidden"].detach().clone().requires_grad_(True)
    loss2, _, _ = fused_vlpo_loss(h2, x["weight"], *list(x.values())[2:], **{**kw, "mu": None, "z": None})
    loss2.backward()
    torch.testing.assert_close(h.grad, 2.5 * h2.grad, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------- bad input ---
def _bad_linear():
    h, w, b, t = _linear(4, 10, 3, torch.float32, "cpu", bias=True)
    return dict(hidden=h, weight=w, targets=t, bias=b)


LINEAR_BAD = [
    ("hidden", lambda a: a.update(hidden=a["hidden"][0]), ValueError, "hidden must be 2-D"),
    ("hidden", lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden must have dtype"),
    ("weight", lambda a: a.update(weight=a["weight"][:, :2]), ValueError, r"weight must be \(V, D\) with D = 3"),
    ("weight", lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight must be on the device"),
    ("weight", lambda a: a.update(weight=a["weight"].half(), hidden=a["hidden"].bfloat16()), TypeError,
     "must not mix float16 and bfloat16"),
    ("targets", lambda a: a.update(targets=a["targets"][:3]), ValueError, "targets must have N = 4"),
    ("targets", lambda a: a.update(targets=a["targets"].float()), TypeError, "targets must have dtype"),
    ("targets", lambda a: a["targets"].__setitem__(2, 10), ValueError, r"targets\[2\] = 10 is outside \[0, V = 10\)"),
    ("bias", lambda a: a.update(bias=a["bias"][:9]), ValueError, r"bias must be \(V,\) with V = 10"),
    ("temperature", lambda a: a.update(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ("chunk_size", lambda a: a.update(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
]


@pytest.fixture
def no_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the argument check")
    monkeypatch.setattr(sweep, "_sweep", boom)


@pytest.mark.parametrize("arg,mutate,exc,msg", LINEAR_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(LINEAR_BAD)])
def test_bad_linear_input_names_the_argument_before_any_kernel(no_kernels, arg, mutate, exc, msg):
    a = _bad_linear()
    mutate(a)
    with pytest.raises(exc, match=msg):
        fused_linear_logprobs(a.pop("hidden"), a.pop("weight"), a.pop("targets"), **a)


VLPO_BAD = [
    ("token_old", lambda x, k: x.update(token_old=x["token_old"][:, :3]), ValueError, "token_old must have shape"),
    ("advantages", lambda x, k: x.update(advantages=x["advantages"][:2]), ValueError, "advantages must have shape"),
    ("token_ref", lambda x, k: k.update(token_ref=None), ValueError, "token_ref: expected reference log-probs"),
    ("z", lambda x, k: k.update(z=None), ValueError, "mu and z must be given together"),
    ("latent_sigma", lambda x, k: k.update(latent_sigma=0.0), ValueError, "latent_sigma must be a finite number"),
    ("tokens", lambda x, k: x["tokens"].__setitem__((0, 0), 5000), ValueError, r"tokens\[token_mask\]\[0\] = 5000"),
    ("tokens", lambda x, k: x["tokens"].__setitem__((0, 0), -100), ValueError, r"tokens\[0, 0\] = -100 \(the ignore"),
    ("mu_ref", lambda x, k: k.update(mu_ref=None), ValueError, "mu_ref: expected the reference's latent means"),
    ("eps_low", lambda x, k: k.update(eps_low=1.5), ValueError, "0 <= eps_low < 1"),
]


@pytest.mark.parametrize("arg,mutate,exc,msg", VLPO_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(VLPO_BAD)])
def test_bad_vlpo_input_names_the_argument_before_any_kernel(no_kernels, arg, mutate, exc, msg):
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    mutate(x, kw)
    with pytest.raises(exc, match=msg):
        fused_vlpo_loss(*x.values(), **kw)
