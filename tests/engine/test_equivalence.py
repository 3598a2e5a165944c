"""The engine against the HF reference loop (engine_reference.py) and against one full
HF forward over [prompt; latents] (docs/engine.md), fp32 on CPU.

Tolerance: fp32, 1e-5 relative to the largest magnitude of the compared tensor (hidden
states reach ~5, logits ~10 with this init): the engine and HF differ only in the order
of floating-point reductions (hand-written decode attention vs SDPA).
"""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from engine_reference import hf_latent_loop
from medlvr.engine import LatentEngine



def close(actual, expected, rel=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(1.0, float(expected.abs().max())))
K, T = 6, 6


@pytest.fixture(scope="module")
def vl_model():
    return tm.qwen2_5_vl()


# Four prompts: different text lengths, image sizes (one text-only), so different
# padding, rope deltas and cache lengths.
SAMPLES = [((4, 6), 3, 1), ((2, 2), 6, 2), (None, 4, 3), ((2, 4), 1, 4)]


def _samples():
    return [tm.vl_sample(hw, n, seed=s) for hw, n, s in SAMPLES]


def _check_against_reference(out, refs, *, k_max, T):
    for b, r in enumerate(refs):
        n = len(r.latents)
        assert int(out.num_latent[b]) == n
        if n:
            close(out.latents[b, :n], torch.stack(r.latents))
            close(out.latent_hidden[b, :n], torch.stack(r.hidden))
        assert torch.all(out.latents[b, n:] == 0) and torch.all(out.latent_hidden[b, n:] == 0)
        m = len(r.tokens)
        assert int(out.text_lengths[b]) == m
        assert out.tokens[b, :m].tolist() == r.tokens
        close(out.logits[b, :m], torch.stack(r.logits))
        assert torch.all(out.logits[b, m:] == 0)
        # greedy: the log-prob is log_softmax(logits)[token]
        lp = torch.log_softmax(torch.stack(r.logits), -1).gather(-1, torch.tensor(r.tokens)[:, None])[:, 0]
        close(out.token_logprobs[b, :m], lp)
        assert torch.all(out.token_logprobs[b, m:] == 0)
        assert len(set(out.tokens[b, m:].tolist())) <= 1  # one pad id after the stop


def test_batch1_matches_hf_loop(vl_model):
    ids, pv, grid = tm.vl_sample((4, 6), 5, seed=11)
    ref = hf_latent_loop(vl_model, ids, pv, grid, k_max=K, latent_end_id=tm.LATENT_END, max_new_tokens=T)
    engine = LatentEngine(vl_model, max_batch=1, max_len=64)
    out = engine.generate(tm.left_pad([(ids, pv, grid)]), k_max=K, max_new_tokens=T,
                          latent_end_id=tm.LATENT_END, return_logits=True)
    assert out.latents.shape == (1, K, 64) and out.tokens.shape == (1, T)
    _check_against_reference(out, [ref], k_max=K, T=T)
    assert out.prompt_lengths.tolist() == [ids.numel()]


def _fixed_refs(model, samples, **kw):
    return [hf_latent_loop(model, *s, k_max=K, latent_end_id=tm.LATENT_END, max_new_tokens=T, **kw)
            for s in samples]


def _threshold_between(values_per_sample, *, margin=1e-3):
    """A threshold that makes the rule `value > thr` fire at different steps for
    different samples, at least `margin` away from every observed value."""
    vals = sorted({round(v, 6) for vs in values_per_sample for v in vs})
    best = None
    for lo, hi in zip(vals, vals[1:]):
        if hi - lo < 2 * margin:
            continue
        thr = (lo + hi) / 2
        exits = {next((t for t, v in enumerate(vs) if v > thr), None) for vs in values_per_sample}
        if len(exits) >= 3:
            best = thr
            break
    assert best is not None, "test setup: no threshold gives varied exit steps"
    return best


@pytest.mark.parametrize("exit", ["fixed", "cosine", "stop_logit", "stop_logit_argmax"])
def test_ragged_batch_matches_hf_loop(vl_model, exit):
    samples = _samples()
    probe = _fixed_refs(vl_model, samples)
    threshold, rule = None, exit
    if exit == "cosine":
        threshold = _threshold_between([r.cosines for r in probe])
    elif exit == "stop_logit":
        threshold = _threshold_between([r.end_logits for r in probe])
    elif exit == "stop_logit_argmax":
        rule = "stop_logit"
    def refs_with(stop_ids):
        return [hf_latent_loop(vl_model, *s, k_max=K, exit=rule, threshold=threshold, latent_end_id=tm.LATENT_END,
                               max_new_tokens=T, stop_ids=stop_ids) for s in samples]

    # A stop id that one sample emits part-way through its answer, so stops are ragged too.
    stop = refs_with([])[1].tokens[2]
    refs = refs_with([stop])
    if exit in ("cosine", "stop_logit"):
        assert len({len(r.latents) for r in refs}) >= 2, "exit steps should differ across samples"
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    out = engine.generate(tm.left_pad(samples), k_max=K, exit=rule, exit_threshold=threshold, max_new_tokens=T,
                          latent_end_id=tm.LATENT_END, stop_ids=[stop], return_logits=True)
    _check_against_reference(out, refs, k_max=K, T=T)
    assert min(out.text_lengths.tolist()) < T  # the stop id fired somewhere


def test_argmax_stop_rule_fires(vl_model):
    """Make <|latent_end|> win the argmax for some steps (scaled-up lm_head row), so the
    argmax rule is exercised with real exits, not only with none."""
    model = tm.qwen2_5_vl()
    with torch.no_grad():
        model.lm_head.weight[tm.LATENT_END] *= 4
    samples = _samples()
    refs = [hf_latent_loop(model, *s, k_max=K, exit="stop_logit", latent_end_id=tm.LATENT_END, max_new_tokens=2)
            for s in samples]
    exits = [len(r.latents) for r in refs]
    assert min(exits) < K, f"test setup: the argmax rule never fired ({exits})"
    out = LatentEngine(model, max_batch=4, max_len=64).generate(
        tm.left_pad(samples), k_max=K, exit="stop_logit", max_new_tokens=2, latent_end_id=tm.LATENT_END,
        return_logits=True)
    _check_against_reference(out, refs, k_max=K, T=2)


def test_full_forward_oracle(vl_model):
    """The latents the engine fed, placed at <|latent_pad|> positions of one HF forward
    (HF computing its own 3-D positions), reproduce themselves: the hidden state at
    position s0 + t - 1 is z_t (the mu/z shift), and the last one is the final step's."""
    samples = _samples()[:2]
    engine = LatentEngine(vl_model, max_batch=2, max_len=64)
    out = engine.generate(tm.left_pad(samples), k_max=K, max_new_tokens=1, latent_end_id=tm.LATENT_END)
    for b, (ids, pv, grid) in enumerate(samples):
        full = torch.cat([ids, torch.full((K,), tm.LATENT_PAD)])
        s0 = ids.numel()
        embeds = vl_model.get_input_embeddings()(full)
        embeds[s0:] = out.latents[b]
        kw = dict(input_ids=full[None], inputs_embeds=embeds[None], mm_token_type_ids=(full == tm.IMAGE).int()[None])
        if pv is not None:
            kw.update(pixel_values=pv, image_grid_thw=grid)
        with torch.no_grad():
            h = vl_model.model(**kw).last_hidden_state[0]
        close(h[s0 - 1:s0 + K - 1], out.latents[b])


def test_positions_follow_hf_rope_index(vl_model):
    samples = _samples()
    batch = tm.left_pad(samples)
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    engine.prefill(batch)
    for b, (ids, pv, grid) in enumerate(samples):
        pos, delta = vl_model.model.get_rope_index(ids[None], (ids == tm.IMAGE).int()[None], image_grid_thw=grid)
        # the first latent's position: sequence index + rope delta, in all three sections
        assert engine.state.positions[:, b].tolist() == [ids.numel() + int(delta)] * 3
        assert engine.state.positions[0, b] == pos.max() + 1


def test_k_max_zero_answers_from_prompt(vl_model):
    samples = _samples()[:3]
    refs = [hf_latent_loop(vl_model, *s, k_max=0, max_new_tokens=4) for s in samples]
    out = LatentEngine(vl_model, max_batch=4, max_len=64).generate(
        tm.left_pad(samples), k_max=0, max_new_tokens=4, return_logits=True)
    assert out.latents.shape == (3, 0, 64) and out.num_latent.tolist() == [0, 0, 0]
    _check_against_reference(out, refs, k_max=0, T=4)


def test_projector_feeds_projected_latents():
    model = tm.qwen2_5_vl()
    torch.manual_seed(5)
    proj = torch.nn.Linear(64, 64)
    with torch.no_grad():
        proj.weight.mul_(0.5).add_(torch.eye(64))
    samples = _samples()[:2]
    refs = [hf_latent_loop(model, *s, k_max=4, latent_end_id=tm.LATENT_END, max_new_tokens=3, projector=proj)
            for s in samples]
    out = LatentEngine(model, max_batch=2, max_len=64, projector=proj).generate(
        tm.left_pad(samples), k_max=4, max_new_tokens=3, latent_end_id=tm.LATENT_END, return_logits=True)
    _check_against_reference(out, refs, k_max=4, T=3)
    assert not torch.allclose(out.latents, out.latent_hidden)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen2_vl"])
def test_other_families_match_hf_loop(family):
    if family == "qwen2_vl":
        model = tm.qwen2_5_vl(cls_name="Qwen2VL")
        samples = _samples()[:3]
    else:
        model = tm.qwen2_text() if family == "qwen2" else tm.llama()
        samples = [(tm.vl_sample(None, n, seed=s)[0], None, None) for n, s in ((3, 1), (9, 2), (5, 3))]
    refs = [hf_latent_loop(model, *s, k_max=4, latent_end_id=tm.LATENT_END, max_new_tokens=4) for s in samples]
    out = LatentEngine(model, max_batch=4, max_len=48).generate(
        tm.left_pad(samples), k_max=4, max_new_tokens=4, latent_end_id=tm.LATENT_END, return_logits=True)
    _check_against_reference(out, refs, k_max=4, T=4)


def test_engine_reusable_across_calls(vl_model):
    """A second generate on the same engine (other batch size, shorter prompts) gives
    the same result as a fresh engine: no state leaks between calls."""
    samples = _samples()
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    engine.generate(tm.left_pad(samples), k_max=K, max_new_tokens=T, latent_end_id=tm.LATENT_END)
    again = engine.generate(tm.left_pad(samples[2:]), k_max=3, max_new_tokens=3, latent_end_id=tm.LATENT_END)
    fresh = LatentEngine(vl_model, max_batch=4, max_len=64).generate(
        tm.left_pad(samples[2:]), k_max=3, max_new_tokens=3, latent_end_id=tm.LATENT_END)
    torch.testing.assert_close(again.latents, fresh.latents, rtol=0, atol=0)
    assert again.tokens.tolist() == fresh.tokens.tolist()


def test_latent_noise_matches_hf_loop_with_the_same_noise(vl_model):
    """VLPO exploration: z_t = mu_t + sigma * eps_t with eps drawn from the generator as
    one (B, k_max, D) normal tensor; the cosine rule still compares the means."""
    samples = _samples()[:2]
    sigma, seed = 0.3, 7
    eps = torch.empty(2, K, 64).normal_(generator=torch.Generator().manual_seed(seed))
    refs = [hf_latent_loop(vl_model, *s, k_max=K, exit="cosine", threshold=0.97, latent_end_id=tm.LATENT_END,
                           max_new_tokens=3, noise=sigma * eps[b]) for b, s in enumerate(samples)]
    engine = LatentEngine(vl_model, max_batch=2, max_len=64)
    out = engine.generate(tm.left_pad(samples), k_max=K, exit="cosine", exit_threshold=0.97, max_new_tokens=3,
                          latent_end_id=tm.LATENT_END, latent_noise_std=sigma, return_logits=True,
                          generator=torch.Generator().manual_seed(seed))
    _check_against_reference(out, refs, k_max=K, T=3)
    n = out.num_latent
    close(out.latents[0, :n[0]] - out.latent_hidden[0, :n[0]], sigma * eps[0, :n[0]])


def test_bucket_padding_rows_are_inert(vl_model):
    """On CUDA a batch runs padded to its graph bucket (3 -> 4 rows). Forcing the same
    padding on CPU: the extra row (inactive, length 0) changes nothing for the others."""
    samples = _samples()[:3]
    kw = dict(k_max=K, exit="cosine", exit_threshold=0.97, max_new_tokens=T, latent_end_id=tm.LATENT_END,
              stop_ids=[2], return_logits=True)
    plain = LatentEngine(vl_model, max_batch=4, max_len=64).generate(tm.left_pad(samples), **kw)
    padded_engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    padded_engine.state.bucketed = True  # the padding CUDA graphs use: 3 -> 4 rows
    padded = padded_engine.generate(tm.left_pad(samples), **kw)
    assert padded_engine.state.bucket == 4 and padded_engine.state.lengths[3] == 0
    for a, b in ((padded.latents, plain.latents), (padded.logits, plain.logits)):
        close(a, b, rel=1e-6)
    assert padded.tokens.tolist() == plain.tokens.tolist()
    assert padded.num_latent.tolist() == plain.num_latent.tolist()
