"""The training call sites of the fused lm_head ops: stage 1's answer cross-entropy (per sample,
and the loss through fused_linear_cross_entropy) and VLPO's teacher-forced token log-probs equal
the unfused path (lm_head -> logits -> log-softmax, selected with force_backend("reference")),
and VLPO's step equals the same step with its loss from medlvr/reference/fused_logprobs.py
(fused_vlpo_loss_ref), with a plain head and with one the fused op cannot take; in fp32 and
under CPU bf16 autocast with fp32 weights, and gradients reach the lm_head in its own dtype."""
import contextlib

import pytest
import torch

import medlvr
from medlvr.models import build_default
from medlvr.models.hf import unwrap
from medlvr.policy import latent
from medlvr.train.vlpo.rollout import policy_forward
from medlvr.reference.fused_logprobs import fused_vlpo_loss_ref
from medlvr.train.vlpo import VLPOConfig, policy_updater, vlpo_loop

from _latent_batches import make_batch
from _threads import one_thread  # noqa: F401  (autouse fixture)
from test_vlpo import L_END, _random_reward, _rollouts, _step, lora, tiny_model


def _amp(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("autocast", [False, True])
def test_stage1_answer_ce_equals_the_logits_cross_entropy(autocast):
    model, processor = build_default(seed=0)
    model = model.float().eval()
    batch = make_batch(processor, k=2)
    with _amp(autocast):
        out = latent.forward_with_latents(model, batch, None, k=0, return_hidden=True)
        ref, n_ref = latent.per_sample_ce(unwrap(model).lm_head(out.hidden), batch.labels)
        rec = latent.recurrent_forward(model, batch, k=2)
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(out.ce, ref, rtol=tol, atol=tol)
    assert torch.equal(out.n_tokens, n_ref) and out.logits is None
    rec.ce.sum().backward()
    g = unwrap(model).lm_head.weight.grad
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0


@pytest.mark.parametrize("mode,k", [("recurrent", 0), ("recurrent", 2), ("teacher-forced", 2)])
@pytest.mark.parametrize("autocast", [False, True])
def test_stage1_loss_through_the_fused_cross_entropy_equals_the_unfused_loss(mode, k, autocast, monkeypatch):
    """Stage 1's loss takes the CE mean from fused_linear_cross_entropy (gradients in its
    forward); value and every parameter gradient equal the unfused path's."""
    from medlvr.policy import LatentLM
    from medlvr.train.sft import Stage1Config, stage1_loss

    calls = []
    fused = latent.fused_linear_cross_entropy
    monkeypatch.setattr(latent, "fused_linear_cross_entropy", lambda *a, **kw: calls.append(1) or fused(*a, **kw))

    model, processor = build_default(seed=0)
    lm = LatentLM(model.float().eval(), Stage1Config(k_latent=k, mode=mode, roi_weight=0.5, projector=k > 0))
    batch = make_batch(processor, k=k)
    out = []
    for backend in (contextlib.nullcontext(), medlvr.force_backend("reference")):
        lm.zero_grad(set_to_none=True)
        with backend, _amp(autocast):
            loss, res = stage1_loss(lm, batch)
        (3.0 * loss).backward()  # an upstream scale, as gradient accumulation gives
        out.append((res, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}))
    (got, g_got), (want, g_want) = out
    assert len(calls) == 2, "stage 1 must take its CE loss from the fused cross-entropy"
    tol = 2e-2 if autocast else 1e-5
    for key in ("loss", "ce", "roi"):
        torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol, msg=key)
    assert set(g_got) == set(g_want) and "model.lm_head.weight" in g_got
    for name in g_want:
        scale = max(g_want[name].abs().max().item(), 1e-3)
        err = (g_got[name] - g_want[name]).abs().max().item() / scale
        assert err <= (5e-2 if autocast else 1e-4), f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("autocast", [False, True])
def test_vlpo_token_logprobs_equal_the_unfused_path(autocast):
    model = tiny_model(0).float()
    ro = _rollouts(model, n=2, k=2, sigma=0.3)
    out = {}
    for backend in ("ext", "reference"):
        model.zero_grad(set_to_none=True)
        with medlvr.force_backend(backend), _amp(autocast):
            tok, lat = policy_forward(model, ro, latent_end_id=L_END, temperature=0.9, latent_sigma=0.3)
            (tok * torch.linspace(-1, 1, tok.numel()).view_as(tok)).sum().backward()
        out[backend] = tok.detach(), model.lm_head.weight.grad.clone()
    tol = 2e-2 if autocast else 1e-5
    assert out["ext"][0].dtype == torch.float32 and out["ext"][1].dtype == torch.float32
    torch.testing.assert_close(out["ext"][0], out["reference"][0], rtol=tol, atol=tol)
    torch.testing.assert_close(out["ext"][1], out["reference"][1], rtol=tol, atol=tol)


def test_vlpo_step_runs_under_bf16_autocast_with_fp32_weights():
    policy = lora(tiny_model(1).float())
    cfg = VLPOConfig(n_rollouts=2, k_latent=2, latent_sigma=0.3, max_new_tokens=4, kl_beta=0.1,
                     rollout_backend="hf", loop=vlpo_loop(lr=1e-2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = _step(policy, cfg, _random_reward)
    assert m["ratio_text"] == 1.0 and m["kl_text"] == 0.0
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0


def _sgd_step(policy, cfg, *, ref=None, projector=None, autocast=False):
    """One vlpo_step with plain SGD (lr from cfg, no clipping): the parameter change is
    lr * gradient, so two ways of computing the loss can be compared parameter by parameter."""
    from test_vlpo import TOKENS, prompt_batch

    from medlvr.train.vlpo import vlpo_step

    params = [p for p in policy.parameters() if p.requires_grad]
    if projector is not None:
        params += list(projector.parameters())
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    with _amp(autocast):
        updater = policy_updater(policy, torch.optim.SGD(params, lr=cfg.loop.lr), cfg, tokens=TOKENS, projector=projector)
        m = vlpo_step(policy, prompt_batch(), _random_reward, updater, cfg,
                      tokens=TOKENS, generator=torch.Generator().manual_seed(0), ref_model=ref, projector=projector)
    return m, {n: (before[n] - p.detach()) for n, p in policy.named_parameters() if n in before}


def _case(case: str, kw: dict):
    """(policy, cfg, extra _sgd_step arguments) of one comparison case, built afresh from fixed seeds."""
    import copy

    from medlvr.policy.latent import LatentProjector

    torch.manual_seed(0)
    if case == "lora-kl-2epochs":
        return lora(tiny_model(1).float()), VLPOConfig(**kw, ppo_epochs=2), {}
    if case == "full-ref-projector":
        policy = tiny_model(2).float()
        proj = LatentProjector(32)
        torch.nn.init.normal_(proj.down.weight, std=0.1)
        return policy, VLPOConfig(**kw), dict(ref=copy.deepcopy(policy).requires_grad_(False), projector=proj)
    if case == "sigma0-rollout-old":
        cfg = VLPOConfig(**{**kw, "latent_sigma": 0.0, "kl_beta": 0.0}, old_logprobs="rollout", ppo_epochs=2)
        return tiny_model(3).float(), cfg, {}
    return lora(tiny_model(4).float()), VLPOConfig(**kw), dict(autocast=True)


def _assert_same_step(got, want, tol: float, grad_tol: float):
    (m_f, d_f), (m_u, d_u) = got, want
    assert set(m_f) == set(m_u)
    for k in m_u:
        assert abs(m_f[k] - m_u[k]) <= tol * max(1.0, abs(m_u[k])), (k, m_f[k], m_u[k])
    assert set(d_f) == set(d_u) and any(d.abs().max() > 0 for d in d_u.values())
    for n in d_u:
        scale = max(d_u[n].abs().max().item(), 1e-6)
        assert (d_f[n] - d_u[n]).abs().max().item() <= grad_tol * scale + 1e-7, n


_KW = dict(n_rollouts=2, k_latent=2, latent_sigma=0.3, max_new_tokens=4, kl_beta=0.1,
           loop=vlpo_loop(lr=0.1, max_grad_norm=0.0))


def _reference_loss(monkeypatch):
    """The step's loss computed by medlvr/reference/fused_logprobs.py's fused_vlpo_loss_ref (the
    objective written from the papers, logits materialised) instead of the fused op."""
    from medlvr.train.vlpo import step as step_module

    def reference(*args, **kwargs):
        kwargs.pop("chunk_size", None)
        loss, token_logp, latent_logp = fused_vlpo_loss_ref(*args, **kwargs)
        return loss, token_logp.detach(), latent_logp.detach()  # as the op returns them

    monkeypatch.setattr(step_module, "fused_vlpo_loss", reference)


@pytest.mark.parametrize("case", ["lora-kl-2epochs", "full-ref-projector", "sigma0-rollout-old", "bf16-autocast"])
def test_vlpo_step_through_fused_vlpo_loss_equals_the_reference_step(case, monkeypatch):
    """The step scores through fused_vlpo_loss; the update and every statistic equal the same
    step with the loss from the reference objective (fused_vlpo_loss_ref)."""
    from medlvr.train.vlpo import step as step_module

    calls = []
    fused = step_module.fused_vlpo_loss
    with monkeypatch.context() as m:
        m.setattr(step_module, "fused_vlpo_loss", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
        policy, cfg, extra = _case(case, _KW)
        got = _sgd_step(policy, cfg, **extra)
    assert len(calls) == (2 if "2epochs" in case or "rollout-old" in case else 1), "the fused step must be used"
    with monkeypatch.context() as m:
        _reference_loss(m)
        policy, cfg, extra = _case(case, _KW)
        want = _sgd_step(policy, cfg, **extra)
    bf16 = case == "bf16-autocast"
    _assert_same_step(got, want, 2e-2 if bf16 else 1e-5, 5e-2 if bf16 else 1e-4)


def _own_forward(model):
    """The lm_head with its forward set on the instance: the same h @ W^T + b, but a head the
    fused op may not compute from its weight (fusable_lm_head / fusable_head say no), as a
    LoRA or quantised wrapper on it would be."""
    import types

    from medlvr.ops import fusable_lm_head

    head = unwrap(model).lm_head
    head.forward = types.MethodType(torch.nn.Linear.forward, head)
    assert not fusable_lm_head(head)
    return model


@pytest.mark.parametrize("case", ["lora-kl-2epochs", "full-ref-projector", "sigma0-rollout-old"])
def test_vlpo_step_with_a_head_the_fused_op_cannot_take_equals_the_reference_step(case, monkeypatch):
    """A head run through its own forward (lm_head_logprobs, then vlpo_loss) gives the update and
    statistics of the reference objective on a plain head; the fused op is not called."""
    from medlvr.train.vlpo import step as step_module

    with monkeypatch.context() as m:
        m.setattr(step_module, "fused_vlpo_loss", lambda *a, **kw: pytest.fail("fused op on a non-fusable head"))
        policy, cfg, extra = _case(case, _KW)
        got = _sgd_step(_own_forward(policy), cfg, **extra)
    with monkeypatch.context() as m:
        _reference_loss(m)
        policy, cfg, extra = _case(case, _KW)
        want = _sgd_step(policy, cfg, **extra)
    _assert_same_step(got, want, 1e-5, 1e-4)
