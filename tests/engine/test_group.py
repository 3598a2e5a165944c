"""Grouped generation (medlvr/engine/group.py): G rows per prompt sharing the prompt's
K/V through cascade attention equal the same prompts repeated G times as independent
rows, given the same generator (fp32, CPU): latents, exits, tokens, log-probs, logits.

Ragged prompts (image sizes, a text-only prompt), every exit rule, greedy and sampled
with latent noise, both prefix paths (heads folded per group, and the row map), bucket
padding rows, k_max = 0 through the phases, and the capacity rules of the prompt cache.
"""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.capture import capture_checks
from medlvr.engine import LatentEngine, group

K, T, G = 4, 5, 3
SAMPLES = [((4, 6), 3, 1), (None, 6, 2), ((2, 4), 1, 4)]


@pytest.fixture(scope="module")
def vl_model():
    return tm.qwen2_5_vl()


def _batches(g=G):
    samples = [tm.vl_sample(hw, n, seed=s) for hw, n, s in SAMPLES]
    return tm.left_pad(samples), tm.left_pad([s for s in samples for _ in range(g)])


def close(a, b, rel=1e-5):
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max())))


def _same(got, want):
    assert torch.equal(got.num_latent, want.num_latent)
    close(got.latents, want.latents)
    close(got.latent_hidden, want.latent_hidden)
    assert torch.equal(got.text_lengths, want.text_lengths)
    assert torch.equal(got.tokens, want.tokens)
    close(got.token_logprobs, want.token_logprobs)
    close(got.logits, want.logits)
    assert torch.equal(got.prompt_lengths, want.prompt_lengths)


EXITS = [("fixed", None), ("cosine", 0.5), ("stop_logit", None), ("stop_logit", 0.0)]
SAMPLING = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_p=0.9, latent_noise_std=0.1)}


@pytest.mark.parametrize("exit,threshold", EXITS)
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_group_rows_equal_independent_rows(vl_model, exit, threshold, sampling):
    prompts, repeated = _batches()
    kw = dict(k_max=K, exit=exit, exit_threshold=threshold, max_new_tokens=T, latent_end_id=tm.LATENT_END,
              stop_ids=[tm.LATENT_END, 20], return_logits=True, **SAMPLING[sampling])
    grouped = LatentEngine(vl_model, max_batch=9, max_len=K + T, max_prompts=3, max_prompt_len=32)
    plain = LatentEngine(vl_model, max_batch=9, max_len=32 + K + T)
    got = grouped.generate(prompts, group_size=G, generator=torch.Generator().manual_seed(0), **kw)
    want = plain.generate(repeated, generator=torch.Generator().manual_seed(0), **kw)
    assert got.tokens.shape == (len(SAMPLES) * G, T)
    _same(got, want)
    if sampling == "sampled":  # the rows of a group really differ (per-row noise)
        assert not torch.equal(got.latents[0], got.latents[1])


@pytest.mark.parametrize("fold_max", [1, 64], ids=["row-map", "folded"])
def test_both_prefix_paths_and_bucket_padding(vl_model, monkeypatch, fold_max):
    """fold_max=1 forces the row-map prefix path; bucketing pads 9 rows to 16, the padding
    rows must stay inert (no prefix, no suffix)."""
    monkeypatch.setattr(group, "FOLD_MAX", fold_max)
    prompts, repeated = _batches()
    kw = dict(k_max=K, exit="cosine", exit_threshold=0.5, max_new_tokens=T, latent_end_id=tm.LATENT_END,
              temperature=1.0, latent_noise_std=0.2, return_logits=True)
    grouped = LatentEngine(vl_model, max_batch=16, max_len=K + T, max_prompts=4, max_prompt_len=32)
    grouped.state.bucketed = True
    plain = LatentEngine(vl_model, max_batch=16, max_len=32 + K + T)
    plain.state.bucketed = True  # the same draws: the sampler's noise is drawn per bucket row
    want = plain.generate(repeated, generator=torch.Generator().manual_seed(3), **kw)
    with capture_checks():  # the grouped step is capture-safe on both paths
        got = grouped.generate(prompts, group_size=G, generator=torch.Generator().manual_seed(3), **kw)
    assert grouped.state.bucket == 16
    _same(got, want)


def test_k0_phases_and_reuse(vl_model):
    """k_max = 0 through the public phases (VLPO's form), then a grouped and an
    independent request on one engine, one after the other."""
    prompts, repeated = _batches(2)
    eng = LatentEngine(vl_model, max_batch=6, max_len=40, max_prompts=3)
    kw = dict(first_token=tm.LATENT_END, temperature=0.7, stop_ids=[30])
    eng.prefill(prompts, group_size=2)
    assert eng.latent_segment(0).latents.shape == (6, 0, 64)
    got = eng.decode_text(T, generator=torch.Generator().manual_seed(1), **kw)
    eng.prefill(repeated)
    eng.latent_segment(0)
    want = eng.decode_text(T, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(got.tokens, want.tokens)
    close(got.token_logprobs, want.token_logprobs)


def test_capacity_and_bad_input(vl_model):
    prompts, repeated = _batches()
    kw = dict(k_max=K, max_new_tokens=T, latent_end_id=tm.LATENT_END)
    eng = LatentEngine(vl_model, max_batch=9, max_len=K + T, max_prompts=3, max_prompt_len=32)
    eng.generate(prompts, group_size=G, **kw)  # the rows' own cache holds exactly K + T: fits
    with pytest.raises(ValueError, match="max_len"):  # independent rows need the prompt in max_len
        eng.generate(repeated, **kw)
    with pytest.raises(ValueError, match="max_len"):
        eng.generate(prompts, group_size=G, k_max=K + 1, max_new_tokens=T, latent_end_id=tm.LATENT_END)
    with pytest.raises(ValueError, match="max_prompts"):
        LatentEngine(vl_model, max_batch=9, max_len=64).generate(prompts, group_size=G, **kw)
    with pytest.raises(ValueError, match="max_batch"):
        eng.generate(prompts, group_size=4, **kw)
    with pytest.raises(ValueError, match="group_size"):
        eng.generate(prompts, group_size=0, **kw)
    with pytest.raises(ValueError, match="max_prompt_len"):
        LatentEngine(vl_model, max_batch=9, max_len=K + T, max_prompts=3, max_prompt_len=8).generate(
            prompts, group_size=G, **kw)
    with pytest.raises(ValueError, match="max_prompts"):
        LatentEngine(vl_model, max_batch=9, max_len=9, max_prompts=-1)
