"""The gpt2 adapter (Coconut's checkpoints) against HF GPT2LMHeadModel, fp32 on CPU:
the reference latent loop (medlvr/engine/hf_loop.py) on the HF model, and one
full HF forward over [prompt; latents; answer] with the latents as inputs_embeds
(GPT2Model adds the learned positions to them). Tolerance as tests/engine/test_equivalence.py."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.engine import LatentEngine
from medlvr.engine.hf_loop import latent_loop

K, T = 4, 5


def close(actual, expected, rel=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(1.0, float(expected.abs().max())))


@pytest.fixture(scope="module")
def model():
    return tm.gpt2()


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [(torch.cat([torch.randint(10, tm.VOCAB, (n,), generator=g), torch.tensor([tm.LATENT_START])]),
                None, None) for n in lengths]
    b = tm.left_pad(samples)
    del b["mm_token_type_ids"]
    return b


@pytest.mark.parametrize("lengths", [[7], [5, 11, 3]])
@pytest.mark.parametrize("exit_kw", [dict(exit="fixed"), dict(exit="count", latent_counts=None)])
def test_gpt2_engine_matches_hf_loop(model, lengths, exit_kw):
    batch = _batch(lengths)
    kw = dict(exit_kw)
    if kw["exit"] == "count":
        kw["latent_counts"] = [(K - b) % (K + 1) for b in range(len(lengths))]
    ref = latent_loop(model, batch, k=K, max_new_tokens=T, first_token=tm.LATENT_END, latent_end_id=tm.LATENT_END,
                      return_logits=True, **kw)
    out = LatentEngine(model, max_batch=4, max_len=64).generate(
        batch, k_max=K, max_new_tokens=T, latent_end_id=tm.LATENT_END, return_logits=True, **kw)
    assert out.num_latent.tolist() == ref.num_latent.tolist()
    close(out.latents, ref.latents)
    close(out.logits, ref.logits)
    assert out.tokens.tolist() == ref.tokens.tolist()


def test_gpt2_latents_reproduce_in_one_full_forward(model):
    """Batch 1: feeding [prompt embeds; z_0..z_{K-1}; <end> a_0 ..] to GPT2LMHeadModel in
    one call gives the latents back (z_{t+1} = ln_f output at position s0 + t) and the
    engine's answer logits."""
    batch = _batch([9])
    out = LatentEngine(model, max_batch=1, max_len=64).generate(
        batch, k_max=K, max_new_tokens=T, latent_end_id=tm.LATENT_END, return_logits=True)
    wte = model.get_input_embeddings()
    ids = batch["input_ids"][0]
    answer = torch.cat([torch.tensor([tm.LATENT_END]), out.tokens[0, :T - 1]])
    embeds = torch.cat([wte(ids), out.latents[0], wte(answer)])[None]
    with torch.no_grad():
        full = model(inputs_embeds=embeds, output_hidden_states=True)
    S = ids.numel()
    last = full.hidden_states[-1][0]  # post ln_f
    close(out.latents[0, 0], last[S - 1])
    close(out.latents[0, 1:], last[S:S + K - 1])
    close(out.logits[0], full.logits[0, S + K:S + K + T])


def test_gpt2_refuses_max_len_past_learned_positions(model):
    with pytest.raises(ValueError, match="128 learned positions"):
        LatentEngine(model, max_batch=1, max_len=129)


def test_gpt2_unsupported_layer_scale():
    m = tm.gpt2()
    m.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        LatentEngine(m, max_batch=1, max_len=32)
