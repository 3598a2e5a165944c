"""VLPO's objective at its edges: the clip at ties and its cap, the KL at large drift (text k3
and the exact latent KL), the latent term's scale and weight, and the fused op's defects
(on-policy eps = 0, fp64 advantages, a scored -100). Oracles are hand formulas written here
from the definitions (PPO's clipped surrogate, Schulman et al. 2017; k3, Schulman 2020; the KL
of two Gaussians with one covariance), not the code under test."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from medlvr.ops import fused_vlpo_loss
from medlvr.reference.fused_logprobs import fused_linear_logprobs_ref
from medlvr.reference.logprobs import latent_gaussian_logprob_ref
from medlvr.ops.vlpo_loss import gaussian_kl, kl_k3, latent_scale, ppo_clip_loss, vlpo_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------ the clip ---
@pytest.mark.parametrize("eps_low,eps_high", [(0.0, 0.0), (0.0, 0.28), (0.2, 0.0)])
def test_on_policy_gradient_is_minus_a_for_any_eps(eps_low, eps_high):
    """r = 1 (on-policy): d L / d logp = -A exactly, also when r sits on a bound (eps = 0);
    a max() of the two branches would split that tie and give -A / 2."""
    logp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    loss, clipped = ppo_clip_loss(logp, torch.zeros(4), adv, eps_low=eps_low, eps_high=eps_high, dual_clip=3.0)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.equal(g, -adv) and not clipped.any()


def test_ratio_cap_never_changes_a_gradient_inside_the_clip_range():
    """Inside [1 - eps_low, 1 + eps_high] the gradient is -A r (the cap at log r = 20 is the
    identity there); outside it the clipped branch has gradient 0 with or without the cap; past
    e^20 the loss stays finite."""
    eps_low, eps_high, c = 0.2, 0.28, 3.0
    log_r = torch.linspace(math.log(1 - eps_low), math.log(1 + eps_high), 41, dtype=torch.float64)
    for a in (1.5, -0.7):
        x = log_r.clone().requires_grad_(True)
        adv = torch.full_like(x, a)
        loss, clipped = ppo_clip_loss(x, torch.zeros_like(x), adv, eps_low=eps_low, eps_high=eps_high, dual_clip=c)
        (g,) = torch.autograd.grad(loss.sum(), x)
        torch.testing.assert_close(g, -a * torch.exp(log_r), rtol=1e-15, atol=0)
        torch.testing.assert_close(loss.detach(), -a * torch.exp(log_r), rtol=1e-15, atol=0)
        assert not clipped.any()
    far = torch.tensor([25.0, 80.0, 800.0], dtype=torch.float64, requires_grad=True)
    for a, want in ((1.0, -(1 + eps_high)), (-1.0, c)):  # clip-higher, dual clip: constant, gradient 0
        loss, clipped = ppo_clip_loss(far, torch.zeros(3, dtype=torch.float64), torch.full((3,), a), eps_low=eps_low,
                                      eps_high=eps_high, dual_clip=c)
        (g,) = torch.autograd.grad(loss.sum(), far)
        assert torch.equal(loss.detach(), torch.full((3,), want, dtype=torch.float64)) and torch.equal(g, 0 * g)
        assert clipped.all()


# -------------------------------------------------------------------------- the KL ---
@pytest.mark.parametrize("d", [-60.0, -30.0, -21.0, 21.0, 30.0])
def test_k3_gradient_never_dies_at_large_drift(d):
    """d = ref - logp past +-20: k3's gradient d/d logp = 1 - e^d is exact below 20 (it tends
    to 1 as d -> -inf) and keeps growing above (the tangent continuation e^20 (1 + d - 20));
    a clamp of d would make it 0 there."""
    logp = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    kl = kl_k3(logp, torch.tensor([d], dtype=torch.float64))
    (g,) = torch.autograd.grad(kl.sum(), logp)
    want_g = 1 - math.exp(min(d, 20.0))
    assert g.item() == pytest.approx(want_g, rel=1e-12)
    want = math.exp(d) - d - 1 if d <= 20 else math.exp(20.0) * (1 + d - 20) - d - 1
    assert kl.item() == pytest.approx(want, rel=1e-12) and math.isfinite(kl.item())


def test_latent_kl_is_exact_and_its_gradient_grows_with_the_drift():
    """KL(N(mu, s^2 I) || N(mu_ref, s^2 I)) = ||mu - mu_ref||^2 / (2 s^2) at any drift (here
    ~ 300 nats, where a k3 of the summed log-ratio, clamped at 20, read 19 with gradient 0),
    and vlpo_loss's latent KL gradient is latent_coef / K * kl_beta * c * (mu - mu_ref) / s^2 / #text."""
    g = torch.Generator().manual_seed(0)
    R, K, D, s = 2, 3, 64, 0.1
    mu_ref = torch.randn(R, K, D, generator=g, dtype=torch.float64)
    mu = (mu_ref + 0.3 * torch.randn(R, K, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    kl = gaussian_kl(mu, mu_ref, s)
    want = ((mu.detach() - mu_ref) ** 2).sum(-1) / (2 * s * s)
    torch.testing.assert_close(kl.detach(), want, rtol=1e-14, atol=0)
    assert kl.min() > 100
    z = mu.detach() + s * torch.randn(R, K, D, generator=g, dtype=torch.float64)
    lat = latent_gaussian_logprob_ref(mu.reshape(-1, D), z.reshape(-1, D), sigma=s).view(R, K)
    mask = torch.ones(R, 2, dtype=torch.bool)
    c, beta, coef = latent_scale(s, D), 0.2, 0.5
    loss, stats = vlpo_loss(token_logp=torch.zeros(R, 2, dtype=torch.float64), token_old=torch.zeros(R, 2),
                            token_mask=mask, latent_logp=lat, latent_old=lat.detach(),
                            advantages=torch.zeros(R, dtype=torch.float64), eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                            latent_coef=coef, kl_beta=beta, token_ref=torch.zeros(R, 2), latent_kl=kl,
                            latent_scale=c)
    (gmu,) = torch.autograd.grad(loss, mu)
    torch.testing.assert_close(gmu, coef / K * beta * c * (mu.detach() - mu_ref) / s**2 / (R * 2), rtol=1e-12, atol=0)
    assert stats["kl_latent"] == pytest.approx(float(want.mean()), rel=1e-12)


# ------------------------------------------------------------- the latent weighting ---
def test_latent_step_gradient_is_on_a_token_scale():
    """With c = sigma / sqrt(D) the on-policy gradient of a latent step w.r.t. mu is
    -A eps / sqrt(D) (times latent_coef / K / #text): norm ~ |A| whatever sigma and D; the raw
    log-prob (c = 1) gives -A eps / sigma, sqrt(D) / sigma times larger."""
    D, s = 4096, 0.1
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(1, 1, D, generator=g, dtype=torch.float64)
    z = mu.detach() + s * eps
    for c, want in ((latent_scale(s, D), eps / math.sqrt(D)), (1.0, eps / s)):
        lat = latent_gaussian_logprob_ref(mu.reshape(-1, D), z.reshape(-1, D), sigma=s).view(1, 1)
        loss, _ = vlpo_loss(token_logp=torch.zeros(1, 1), token_old=torch.zeros(1, 1),
                            token_mask=torch.ones(1, 1, dtype=torch.bool), latent_logp=lat, latent_old=lat.detach(),
                            advantages=torch.tensor([1.0]), eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                            latent_coef=1.0, latent_scale=c)
        (gmu,) = torch.autograd.grad(loss, mu)
        torch.testing.assert_close(gmu, -want, rtol=1e-10, atol=1e-14)
    assert latent_scale(s, D) == pytest.approx(s / 64)


def test_k_latent_steps_do_not_dilute_the_answer():
    """The same latent steps counted twice (K = 2 -> 4) leave the loss and the text gradient
    unchanged: a rollout's latent segment weighs latent_coef tokens whatever K is."""
    tok = torch.tensor([[0.1, -0.2, 0.0], [0.05, 0.0, 0.3]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    lat = torch.tensor([[0.3, -0.1], [0.2, 0.05]])
    adv = torch.tensor([1.0, -0.5])

    def run(latent):
        loss, _ = vlpo_loss(token_logp=tok, token_old=torch.zeros(2, 3), token_mask=mask, latent_logp=latent,
                            latent_old=torch.zeros_like(latent), advantages=adv, eps_low=0.2, eps_high=0.28,
                            dual_clip=3.0, latent_coef=0.5)
        (gt,) = torch.autograd.grad(loss, tok)
        return loss.detach(), gt

    (l2, g2), (l4, g4) = run(lat), run(torch.cat([lat, lat], 1))
    torch.testing.assert_close(l4, l2, rtol=1e-6, atol=0)
    torch.testing.assert_close(g4, g2, rtol=0, atol=0)
    # the text gradient is -A r / #text, as without any latent term
    want = torch.where(mask, -adv[:, None] * torch.exp(tok.detach()) / 5, torch.zeros(2, 3))
    torch.testing.assert_close(g2, want)


# ------------------------------------------------------ fused_vlpo_loss's defects ---
def _fused_case(dtype, *, R=3, T=4, D=8, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, T, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
    tokens = torch.randint(0, V, (R, T), generator=g)
    mask = torch.ones(R, T, dtype=torch.bool)
    mask[1, 3] = False
    return h, w, tokens, mask


@pytest.mark.parametrize("eps_low,eps_high", [(0.0, 0.0), (0.0, 0.28), (0.2, 0.0)])
def test_fused_on_policy_eps0_gradient_is_the_policy_gradient(eps_low, eps_high):
    """token_old None (PPO's first epoch): d loss / d hidden = d/d hidden of -sum A logp / n,
    computed here in fp64 through the unfused log-probs."""
    h, w, tokens, mask = _fused_case(torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    x = h.clone().requires_grad_(True)
    loss, _, _ = fused_vlpo_loss(x, w, tokens, mask, None, adv, latent_old=None, eps_low=eps_low,
                                 eps_high=eps_high, dual_clip=3.0, latent_coef=0.0)
    loss.backward()
    y = h.clone().requires_grad_(True)
    lp = fused_linear_logprobs_ref(y[mask], w, tokens[mask])
    pg = -(adv[:, None].expand_as(mask)[mask] * lp).sum() / mask.sum()
    pg.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-15)
    assert loss.item() == pytest.approx(-(adv[:, None].expand_as(mask)[mask]).sum().item() / mask.sum().item(),
                                        rel=1e-15)


def test_fused_fp64_advantages_stay_fp64():
    """All-fp64 inputs: the on-policy loss is -sum_i A_r(i) / n to fp64 precision (1/3 and 2/7
    are not fp32 numbers: rounding them to fp32 errs by ~1e-8)."""
    h, w, tokens, mask = _fused_case(torch.float64)
    adv = torch.tensor([1 / 3, -2 / 7, 0.1], dtype=torch.float64)
    loss, _, _ = fused_vlpo_loss(h, w, tokens, mask, None, adv, latent_old=None, eps_low=0.2, eps_high=0.28,
                                 dual_clip=3.0, latent_coef=0.0)
    assert loss.dtype == torch.float64
    want = -(adv[:, None].expand_as(mask)[mask]).sum() / mask.sum()
    assert abs(loss.item() - want.item()) < 1e-15


def test_fused_scored_ignore_index_is_an_error():
    h, w, tokens, mask = _fused_case(torch.float32)
    tokens[2, 1] = -100
    with pytest.raises(ValueError, match=r"tokens\[2, 1\] = -100 .*scored position"):
        fused_vlpo_loss(h, w, tokens, mask, None, torch.ones(3), latent_old=None, eps_low=0.2, eps_high=0.28,
                        dual_clip=3.0, latent_coef=0.0)
    mask[2, 1] = False  # unscored: fine
    fused_vlpo_loss(h, w, tokens, mask, None, torch.ones(3), latent_old=None, eps_low=0.2, eps_high=0.28,
                    dual_clip=3.0, latent_coef=0.0)


# --------------------------------------------------------------- a whole step ---
def test_step_reports_the_exact_latent_kl_of_a_drifted_policy():
    """A policy whose latent means have drifted far from the reference's (final norm x 3):
    kl_latent is the exact ||mu - mu_ref||^2 / (2 sigma^2) (hundreds of nats), not a k3 of the
    summed log-ratio clamped at 19."""
    from test_vlpo import TOKENS, prompt_batch, tiny_model

    from medlvr.train.vlpo import VLPOConfig, policy_updater, vlpo_loop, vlpo_step

    policy = tiny_model(7)
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        policy.model.language_model.norm.weight.mul_(3.0)
    cfg = VLPOConfig(n_rollouts=2, k_latent=2, latent_sigma=0.1, max_new_tokens=3, kl_beta=0.1, latent_coef=0.5,
                     loop=vlpo_loop(lr=1e-4))
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=cfg.loop.lr)
    m = vlpo_step(policy, prompt_batch(), lambda ro: {"reward": [float(i % 2) for i in range(ro.tokens.shape[0])]},
                  policy_updater(policy, opt, cfg, tokens=TOKENS), cfg, tokens=TOKENS,
                  generator=torch.Generator().manual_seed(0), ref_model=ref)
    assert m["kl_latent"] > 100 and math.isfinite(m["kl_latent"])
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
