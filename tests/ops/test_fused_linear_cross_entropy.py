"""fused_linear_cross_entropy against the unfused reference (medlvr/reference/fused_logprobs.py)
and against F.cross_entropy over full logits; tolerances as in tests/ops/test_fused_logprobs.py."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medlvr import _backend
from medlvr.ops import _fused_logprobs_sweep as sweep
from medlvr.ops import fused_linear_cross_entropy
from medlvr.reference.fused_logprobs import fused_linear_cross_entropy_ref

requires_ext = pytest.mark.skipif(_backend.extension() is None, reason="medlvr._C was not built")
pytestmark = [requires_ext, pytest.mark.usefixtures("one_torch_thread")]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 1e-2}


def _inputs(n, v, d, dtype, device, *, bias=False, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5 * 3).to(dtype).to(device)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(device)
    if ignore_every:
        t[::ignore_every] = -100
    weights = torch.rand(n, generator=g, dtype=torch.float64).float().to(device) + 0.5
    return h, w, b, t, weights


def _run(fn, h, w, b, t, *, upstream=1.0, **kw):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    loss = fn(leaves[0], leaves[1], t, bias=leaves[2], **kw)
    (loss * upstream).backward()
    return [loss.detach()] + [None if x is None else x.grad for x in leaves]


def _close(got, want, tol, what):
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1.0) if want.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,v,d,chunk,temperature", [(13, 4099, 8, 5, 1.0), (33, 257, 24, None, 0.7),
                                                     (1, 1, 3, None, 1.0)])
def test_loss_and_grads_match_reference(device, dtype, reduction, weighted, n, v, d, chunk, temperature):
    """N not a multiple of the chunk, V not of the kernel's column chunk, every third row ignored."""
    if device == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("medlvr._C was built without CUDA")
    h, w, b, t, weights = _inputs(n, v, d, dtype, device, bias=(v % 2 == 1), ignore_every=3 if n > 3 else 0)
    kw = dict(reduction=reduction, temperature=temperature, weights=weights if weighted else None)
    got = _run(fused_linear_cross_entropy, h, w, b, t, chunk_size=chunk, **kw)
    want = _run(fused_linear_cross_entropy_ref, *(None if x is None else x.double() for x in (h, w, b)), t, **kw)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for name, a, e in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        if e is not None:
            _close(a, e, TOL[dtype], name)
    assert got[1].dtype == dtype and got[2].dtype == dtype


def test_default_is_f_cross_entropy_over_full_logits():
    h, w, b, t, _ = _inputs(40, 1003, 16, torch.float32, "cpu", bias=True, ignore_every=5)
    got = _run(fused_linear_cross_entropy, h, w, b, t, chunk_size=7)
    want = _run(lambda h, w, t, bias: F.cross_entropy(F.linear(h, w, bias), t), h, w, b, t)
    for name, a, e in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)


def test_per_sample_mean_weights_give_the_mean_of_per_sample_means():
    """Stage 1's answer loss: mean over B samples of each sample's mean token CE."""
    h, w, _, t, _ = _inputs(12, 300, 8, torch.float32, "cpu")
    sample = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    t[4] = -100  # sample 1 keeps one token
    n = torch.zeros(4).index_add_(0, sample, (t != -100).float())
    got = _run(fused_linear_cross_entropy, h, w, None, t, weights=1.0 / (4 * n[sample]), reduction="sum")

    def per_sample(h, w, t, bias):
        ce = F.cross_entropy(h @ w.T, t, reduction="none")
        return torch.stack([ce[(sample == s) & (t != -100)].mean() for s in range(4)]).mean()
    want = _run(per_sample, h, w, None, t)
    for name, a, e in zip(("loss", "d hidden", "d weight"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("n", [0, 6])
def test_no_scored_row_gives_zero_not_nan(n):
    h, w, _, t, _ = _inputs(n, 50, 4, torch.float32, "cpu")
    t[:] = -100
    loss, dh, dw, _ = _run(fused_linear_cross_entropy, h, w, None, t)
    assert loss.item() == 0 and not dh.any() and not dw.any()


def test_upstream_scale_return_logprobs_and_one_backward():
    h, w, b, t, _ = _inputs(9, 301, 16, torch.float32, "cpu", bias=True, ignore_every=4)
    a = _run(fused_linear_cross_entropy, h, w, b, t, chunk_size=4, upstream=2.5)
    c = _run(fused_linear_cross_entropy, h, w, b, t, chunk_size=4)
    for x, y in zip(a[1:], c[1:]):
        torch.testing.assert_close(x, 2.5 * y, rtol=1e-6, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(c, _run(fused_linear_cross_entropy, h, w, b, t, chunk_size=4)))
    hh = h.clone().requires_grad_(True)
    loss, logp = fused_linear_cross_entropy(hh, w, t, bias=b, return_logprobs=True, reduction="sum")
    assert not logp.requires_grad and logp.shape == (9,) and (logp[::4] == 0).all()
    torch.testing.assert_close(loss, -logp.sum())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_with_fp32_master_weight(device):
    if device == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("medlvr._C was built without CUDA")
    h, w, _, t, _ = _inputs(9, 301, 16, torch.float32, device, ignore_every=4)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = _run(fused_linear_cross_entropy, h.bfloat16(), w, None, t, chunk_size=4)
        want = _run(fused_linear_cross_entropy_ref, h.bfloat16(), w, None, t)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, a, e in zip(("loss", "d hidden", "d weight"), got, want):
        _close(a, e, 2e-2, name)


def test_never_holds_the_full_logits():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks._common import peak_beyond_outputs

    n, v, d, chunk = 256, 4000, 16, 16
    h, w, _, t, _ = _inputs(n, v, d, torch.float32, "cpu")
    h.requires_grad_(True)
    w.requires_grad_(True)
    _, beyond = peak_beyond_outputs(lambda: torch.autograd.grad(
        fused_linear_cross_entropy(h, w, t, chunk_size=chunk), (h, w)), device=torch.device("cpu"))
    assert beyond < chunk * v * 4 + 64 * 1024, f"{beyond} bytes beyond the gradients"


BAD = [
    ("weights", lambda a: a.update(weights=torch.ones(3)), ValueError, r"weights must have shape \(4,\)"),
    ("weights", lambda a: a.update(weights=torch.ones(4, dtype=torch.long)), TypeError, "weights must have dtype"),
    ("weights", lambda a: a.update(weights=torch.ones(4, device="meta")), ValueError, "weights must be on the device"),
    ("reduction", lambda a: a.update(reduction="none"), ValueError, "reduction"),
    ("targets", lambda a: a["targets"].__setitem__(1, 10), ValueError, r"targets\[1\] = 10 is outside"),
    ("hidden", lambda a: a.update(hidden=a["hidden"][None]), ValueError, "hidden must be 2-D"),
]


@pytest.mark.parametrize("arg,mutate,exc,msg", BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD)])
def test_bad_input_names_the_argument_before_any_kernel(monkeypatch, arg, mutate, exc, msg):
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the argument check")
    monkeypatch.setattr(sweep, "_sweep", boom)
    h, w, b, t, _ = _inputs(4, 10, 3, torch.float32, "cpu", bias=True)
    a = dict(hidden=h, weight=w, targets=t, bias=b)
    mutate(a)
    with pytest.raises(exc, match=msg):
        fused_linear_cross_entropy(a.pop("hidden"), a.pop("weight"), a.pop("targets"), **a)


def test_no_grad_loss_skips_the_gradient_kernel():
    """Under no_grad (an evaluation loss) the sweep computes the loss alone: the same value, and
    neither the log-prob backward kernel nor the gradient GEMMs run."""
    h, w, b, t, weights = _inputs(13, 301, 16, torch.float32, "cpu", bias=True, ignore_every=4)
    want = fused_linear_cross_entropy(h.requires_grad_(True), w, t, bias=b, weights=weights, chunk_size=5)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = fused_linear_cross_entropy(h, w, t, bias=b, weights=weights, chunk_size=5)
    names = [e.name for e in prof.events()]
    assert torch.equal(got, want.detach())
    assert "medlvr::logprobs_bwd_" not in names and names.count("aten::addmm") == 3  # the 3 chunks' logits
