"""The training call sites of the fused lm_head log-prob op (medlvr.ops.lm_head_logprobs): stage 1's
answer cross-entropy and VLPO's teacher-forced token log-probs equal the unfused path
(lm_head -> logits -> log-softmax, selected with force_backend("reference")), in fp32 and
under CPU bf16 autocast with fp32 weights, and gradients reach the lm_head in its own dtype."""
import pytest
import torch

import medlvr
from medlvr.models import build_default
from medlvr.models.hf import unwrap
from medlvr.train import latent as L
from medlvr.train.rollout import policy_forward
from medlvr.train.vlpo_step import VLPOConfig

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
        out = L.forward_with_latents(model, batch, None, k=0, return_hidden=True)
        ref, n_ref = L.per_sample_ce(unwrap(model).lm_head(out.hidden), batch["labels"])
        rec = L.recurrent_forward(model, batch, k=2)
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(out.ce, ref, rtol=tol, atol=tol)
    assert torch.equal(out.n_tokens, n_ref) and out.logits is None
    rec.ce.sum().backward()
    g = unwrap(model).lm_head.weight.grad
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0


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
    cfg = VLPOConfig(n_rollouts=2, k_latent=2, latent_sigma=0.3, max_new_tokens=4, kl_beta=0.1, lr=1e-2,
                     rollout_backend="hf")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = _step(policy, cfg, _random_reward)
    assert m["ratio_text"] == 1.0 and m["kl_text"] == 0.0
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
