"""VLPO's grouped rollouts (backend "engine": the n rows of a prompt share its prefill
and K/V, medlvr/engine/group.py) equal the plain-HF reference loop's (backend "hf",
medlvr/engine/hf_loop.py: the prompts repeated n times as independent rows) with the
same generator: latents, means, tokens, masks and log-probs (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from medlvr.train.vlpo.rollout import RolloutEngine, sample_rollouts
from test_vlpo import IM_END, L_END, PAD, prompt_batch, tiny_model


@pytest.fixture(scope="module")
def peaked():
    m = tiny_model(0)
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)  # trained-like logits: ragged stops (test_vlpo.py)
    return m


def _rollouts(model, backend, *, n, k, sigma, top_p, engine=None):
    return sample_rollouts(model, prompt_batch(), n=n, k_latent=k, latent_sigma=sigma, temperature=0.9,
                           top_p=top_p, max_new_tokens=6, latent_end_id=L_END, stop_id=IM_END, pad_id=PAD,
                           generator=torch.Generator().manual_seed(1), backend=backend, engine=engine)


@pytest.mark.parametrize("n,k,sigma,top_p", [(4, 3, 0.5, 1.0), (3, 2, 0.0, 0.8), (2, 0, 0.3, 1.0)])
def test_grouped_rollouts_equal_the_reference_loop(peaked, n, k, sigma, top_p):
    a = _rollouts(peaked, "hf", n=n, k=k, sigma=sigma, top_p=top_p)
    b = _rollouts(peaked, "engine", n=n, k=k, sigma=sigma, top_p=top_p)
    torch.testing.assert_close(b.latents, a.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.latent_mu, a.latent_mu, atol=1e-5, rtol=1e-5)
    assert torch.equal(b.tokens, a.tokens) and torch.equal(b.token_mask, a.token_mask)
    assert torch.equal(b.stopped, a.stopped)
    torch.testing.assert_close(b.token_logprobs, a.token_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.latent_logprobs, a.latent_logprobs, atol=1e-4, rtol=1e-5)
    for key in a.prompt:
        assert torch.equal(b.prompt[key], a.prompt[key])
    assert len({tuple(r) for r in b.tokens.tolist()}) > 1  # the rows of a group differ


def test_grouped_rollout_engine_holds_each_prompt_once(peaked):
    re = RolloutEngine(peaked, len_multiple=8)
    _rollouts(peaked, "engine", n=4, k=2, sigma=0.2, top_p=1.0, engine=re)
    e = re.engine
    P = prompt_batch().input_ids.shape[0]
    # rows' own cache: K + answer only; the prompts: P rows of the shared prompt cache
    assert (e.max_batch, e.max_len, e.max_prompts) == (4 * P, 8, P)
    assert e.prefix.max_batch == P and e.max_prompt_len >= int(prompt_batch().attention_mask.sum(-1).max())
    _rollouts(peaked, "engine", n=4, k=2, sigma=0.2, top_p=1.0, engine=re)
    assert re.builds == 1
    _rollouts(peaked, "engine", n=6, k=2, sigma=0.2, top_p=1.0, engine=re)  # more rows than it holds
    assert re.builds == 2 and re.engine.max_prompts == P and re.engine.max_batch == 6 * P  # grown
    _rollouts(peaked, "engine", n=2, k=2, sigma=0.2, top_p=1.0, engine=re)
    assert re.builds == 2 and re.engine.max_batch == 6 * P  # never shrunk
