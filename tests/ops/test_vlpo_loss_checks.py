"""fused_vlpo_loss's default latent scale, and the refusal of non-finite arguments by
fused_vlpo_loss and vlpo_loss (a NaN or inf advantage, old / reference log-prob, scale, sigma,
temperature or clip bound used to run through to a NaN loss).

The default: docs/vlpo.md's objective scales every latent log-prob by c = sigma / sqrt(D)
(medlvr.ops.vlpo_loss.latent_scale); VLPOConfig applied it, a direct caller of the op got c = 1.
"""
import pytest
import torch

from medlvr.ops import _checks, fused_vlpo_loss
from medlvr.ops import _fused_logprobs_sweep as sweep
from medlvr.ops.vlpo_loss import group_advantages, latent_scale, vlpo_loss
from medlvr.reference.fused_logprobs import fused_vlpo_loss_ref

from test_fused_logprobs import DEVICES, _ext, _vlpo_inputs, _vlpo_run, requires_ext

pytestmark = [requires_ext, pytest.mark.usefixtures("one_torch_thread")]
NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------ the default scale ---
@pytest.mark.parametrize("device", DEVICES)
def test_default_latent_scale_is_sigma_over_sqrt_d(device):
    _ext(device)
    x, kw = _vlpo_inputs(torch.float32, device, D=16)
    del kw["latent_scale"]
    c = latent_scale(kw["latent_sigma"], 16)
    assert c == pytest.approx(0.7 / 4)
    default = _vlpo_run(fused_vlpo_loss, x, kw)
    explicit = _vlpo_run(fused_vlpo_loss, x, {**kw, "latent_scale": c})
    for k in explicit:  # the same computation: bit-identical
        assert torch.equal(default[k], explicit[k]), k
    raw = _vlpo_run(fused_vlpo_loss, x, {**kw, "latent_scale": 1.0})
    assert not torch.equal(default["d mu"], raw["d mu"])
    # the oracle has the same default, written from the formula
    ref = _vlpo_run(fused_vlpo_loss_ref, x, kw, fp64=True)
    ref_explicit = _vlpo_run(fused_vlpo_loss_ref, x, {**kw, "latent_scale": 0.7 / 4}, fp64=True)
    for k in ref:
        torch.testing.assert_close(ref[k], ref_explicit[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(default[k].double(), ref[k], rtol=1e-5, atol=1e-5, msg=k)


def test_default_latent_scale_without_mu_is_one():
    """No mu: no Gaussian log-prob (0) to scale; the latent term on given old log-probs runs at c = 1."""
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    kw.update(mu=None, z=None, mu_ref=None, kl_beta=0.0, token_ref=None)
    del kw["latent_scale"]
    default = _vlpo_run(fused_vlpo_loss, x, kw)
    one = _vlpo_run(fused_vlpo_loss, x, {**kw, "latent_scale": 1.0})
    assert torch.equal(default["loss"], one["loss"])
    assert torch.equal(_vlpo_run(fused_vlpo_loss_ref, x, kw)["loss"], _vlpo_run(fused_vlpo_loss_ref, x,
                                                                                {**kw, "latent_scale": 1.0})["loss"])


# ------------------------------------------------------------------ non-finite input ---
@pytest.fixture
def no_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a GEMM ran before the argument check")
    monkeypatch.setattr(sweep, "_sweep", boom)


def _put(which, value, index):
    def mutate(x, kw):
        (x if which in x else kw)[which][index] = value
    return mutate


def _set(**changes):
    return lambda x, kw: kw.update(changes)


FUSED_BAD = [
    ("advantages", _put("advantages", NAN, 1)),
    ("advantages", _put("advantages", INF, 0)),
    ("advantages", _put("advantages", -INF, 2)),
    ("token_old", _put("token_old", NAN, (0, 3))),  # row 0 is scored everywhere
    ("token_old", _put("token_old", INF, (0, 0))),
    ("token_ref", _put("token_ref", NAN, (0, 1))),
    ("latent_old", _put("latent_old", INF, (2, 1))),
    ("mu_ref", _put("mu_ref", NAN, (1, 0, 5))),
    ("latent_scale", _set(latent_scale=INF)),
    ("latent_scale", _set(latent_scale=NAN)),
    ("latent_sigma", _set(latent_sigma=NAN)),
    ("latent_sigma", _set(latent_sigma=INF)),
    ("temperature", _set(temperature=INF)),
    ("temperature", _set(temperature=NAN)),
    ("eps_low", _set(eps_low=NAN)),
    ("eps_high", _set(eps_high=INF)),
    ("eps_high", _set(eps_high=NAN)),
    ("dual_clip", _set(dual_clip=INF)),
    ("dual_clip", _set(dual_clip=NAN)),
    ("latent_coef", _set(latent_coef=INF)),
    ("kl_beta", _set(kl_beta=NAN)),
]


@pytest.mark.parametrize("arg,mutate", FUSED_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(FUSED_BAD)])
def test_fused_refuses_non_finite_before_any_gemm(no_kernels, arg, mutate):
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    mutate(x, kw)
    with pytest.raises(ValueError, match=rf"^{arg}(: expected| must be a finite)"):
        fused_vlpo_loss(*x.values(), **kw)


def test_fused_names_the_first_non_finite_entry():
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    x["advantages"][1] = NAN
    with pytest.raises(ValueError, match=r"advantages: expected finite values, got nan at advantages\[1\]"):
        fused_vlpo_loss(*x.values(), **kw)
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    x["token_old"][0, 3] = INF
    with pytest.raises(ValueError, match=r"token_old: expected finite values at the scored positions .*"
                                         r"got inf at token_old\[0, 3\]"):
        fused_vlpo_loss(*x.values(), **kw)


def test_values_that_do_not_enter_the_loss_are_not_refused():
    """Old / reference log-probs at unscored positions, latent old log-probs with the latent
    term off, reference inputs with kl_beta 0: the loss never reads them."""
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    x["token_mask"][1, 2] = False
    want = _vlpo_run(fused_vlpo_loss, x, kw)["loss"]
    x["token_old"][1, 2] = -INF
    kw["token_ref"][1, 2] = NAN
    got = _vlpo_run(fused_vlpo_loss, x, kw)["loss"]
    assert torch.isfinite(got) and torch.equal(got, want)
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    kw["latent_old"][0, 0] = NAN
    kw["token_ref"][0, 0] = NAN
    kw.update(latent_coef=0.0, kl_beta=0.0)
    assert torch.isfinite(_vlpo_run(fused_vlpo_loss, x, kw)["loss"])


def test_fused_value_checks_read_the_device_once(monkeypatch):
    """The -100 check and every finiteness flag come back in one transfer (one sync on CUDA)."""
    calls = []
    real = _checks.read_flags
    monkeypatch.setattr(_checks, "read_flags", lambda *f: calls.append(len(f)) or real(*f))
    x, kw = _vlpo_inputs(torch.float32, "cpu")
    fused_vlpo_loss(*x.values(), **kw)
    assert calls == [6]  # -100, advantages, token_old, token_ref, latent_old, mu_ref


@pytest.mark.cuda
def test_fused_refuses_non_finite_on_cuda():
    _ext("cuda")
    x, kw = _vlpo_inputs(torch.float32, "cuda")
    x["advantages"][2] = INF
    with pytest.raises(ValueError, match=r"advantages: expected finite values, got inf at advantages\[2\]"):
        fused_vlpo_loss(*x.values(), **kw)


# ------------------------------------------------------------------ the unfused objective ---
def _unfused(**changes):
    R, T, K = 2, 3, 2
    args = dict(token_logp=torch.zeros(R, T), token_old=torch.zeros(R, T),
                token_mask=torch.ones(R, T, dtype=torch.bool), latent_logp=torch.zeros(R, K), latent_old=torch.zeros(R, K), advantages=torch.tensor([1.0, -1.0]),
                eps_low=0.2, eps_high=0.28, dual_clip=3.0, latent_coef=0.5, kl_beta=0.1, token_ref=torch.zeros(R, T),
                latent_kl=torch.zeros(R, K), latent_scale=0.1)
    return vlpo_loss(**{**args, **changes})


UNFUSED_BAD = [("eps_low", NAN), ("eps_low", 1.0), ("eps_high", INF), ("eps_high", NAN), ("dual_clip", INF),
               ("dual_clip", 0.5), ("latent_coef", NAN), ("latent_coef", INF), ("kl_beta", INF), ("kl_beta", -0.1),
               ("latent_scale", INF), ("latent_scale", NAN), ("latent_scale", 0.0)]


@pytest.mark.parametrize("arg,value", UNFUSED_BAD, ids=[f"{a}={v}" for a, v in UNFUSED_BAD])
def test_vlpo_loss_refuses_bad_scalars(arg, value):
    assert torch.isfinite(_unfused()[0])
    with pytest.raises(ValueError, match=rf"^{arg}: expected .*got {value}"):
        _unfused(**{arg: value})


def test_scalar_type_is_named():
    with pytest.raises(TypeError, match="eps_high must be a float, got str"):
        _unfused(eps_high="0.2")


@pytest.mark.parametrize("eps", [NAN, INF, -1e-6])
def test_group_advantages_refuses_a_bad_eps(eps):
    with pytest.raises(ValueError, match=r"^eps: expected a finite eps >= 0"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2, eps=eps)
