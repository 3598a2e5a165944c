"""The repetition penalty (``repetition_penalty=``): HF's RepetitionPenaltyLogitsProcessor in
the engine and the plain-HF loop, fp32 on CPU.

- the penalty math (medlvr/engine/sampling.py) equals its row-by-row spec
  (medlvr/reference/sampling.py) and, exactly, HF's own processor on the same logits and ids
  (the outside oracle), the engine's "seen" mask built from a left-padded prompt included;
- at k_max = 0 the engine's greedy tokens equal HF ``model.generate(..., repetition_penalty=p,
  do_sample=False)``; at k_max > 0 the engine equals the plain-HF loop (greedy and sampled);
- what counts as seen: the unpadded prompt ids and every token fed (<|latent_end|> included),
  no latent; grouped rows equal independent rows; the text step stays capture-safe; bad
  values are refused before anything runs.
"""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.capture import capture_checks
from medlvr.engine import LatentEngine, sampling
from medlvr.engine.hf_loop import latent_loop
from medlvr.engine.state import DecodeState
from medlvr.reference import sampling as spec

SAMPLES = [((4, 6), 3, 1), ((2, 2), 6, 2), (None, 4, 3), ((2, 4), 1, 4)]
PENALTIES = [1.05, 1.3]


@pytest.fixture(scope="module")
def vl_model():
    return tm.qwen2_5_vl()


def _samples(n=4):
    return [tm.vl_sample(hw, k, seed=s) for hw, k, s in SAMPLES[:n]]


def close(a, b, rel=1e-5):
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max())))


def _logits_and_ids(seed, B=5, V=23, S=9):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(B, V, generator=g)
    logits[:, :3] = torch.tensor([0.0, -1.5, 2.5])  # a zero, a negative and a positive logit always seen
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[:, :4] = torch.tensor([0, 1, 2, 1])  # repeats count once
    return logits, ids


def _mask(ids, V):
    return torch.zeros(ids.shape[0], V, dtype=torch.bool).scatter_(1, ids, True)


# ------------------------------------------------------------------ the math
@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.7, 2.0])
def test_penalty_equals_spec(penalty):
    for seed in range(4):
        logits, ids = _logits_and_ids(seed)
        got = sampling.repetition_penalty(logits, _mask(ids, logits.shape[1]), torch.tensor(penalty))
        want = spec.repetition_penalty(logits, ids.tolist(), penalty)
        close(got, want, rel=1e-6)  # fp32 (penalty rounded to fp32) against fp64 rounded once
        unseen = ~_mask(ids, logits.shape[1])
        assert torch.equal(got[unseen], logits[unseen]) and got[0, 0] == 0


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.7, 2.0])
def test_penalty_equals_hf_processor(penalty):
    """The outside oracle: transformers' own processor on the same fp32 logits and input_ids."""
    from transformers import RepetitionPenaltyLogitsProcessor

    for seed in range(4):
        logits, ids = _logits_and_ids(seed)
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = sampling.repetition_penalty(logits, _mask(ids, logits.shape[1]), torch.tensor(penalty))
        assert torch.equal(got, want), seed


def test_penalty_inverse_is_the_fp32_reciprocal():
    from medlvr.engine.state import penalty_inverse

    for p in (1.05, 1.3, 0.7, 3.0):
        inv = torch.tensor(penalty_inverse(p), dtype=torch.float32)
        assert inv == torch.tensor(1.0) / torch.tensor(p) and float(inv) == penalty_inverse(p)
        x = torch.tensor([2.5, -1.5, 0.0])
        got = sampling.repetition_penalty(x[None], torch.ones(1, 3, dtype=torch.bool), torch.tensor(p), inv)
        assert torch.equal(got[0], torch.stack([x[0] * inv, x[1] * torch.tensor(p), x[2]]))


def test_seen_mask_of_a_left_padded_prompt_is_hf_s():
    """HF generate ignores the left padding (prompt_ignore_length = the padding lengths, from
    attention_mask); the engine's DecodeState.mark_prompt does too, and drops ids past V."""
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, ids = _logits_and_ids(7, B=4, V=23, S=8)
    mask = torch.ones_like(ids)
    for b, pad in enumerate([0, 3, 5, 1]):
        mask[b, :pad] = 0
        ids[b, :pad] = 4  # the pad id, not in any row's prompt otherwise
    ids[ids == 4] = torch.where(mask[ids == 4] == 1, 5, 4)
    state = DecodeState(max_batch=6, hidden_size=8, vocab_size=23, position_rows=1, dtype=torch.float32,
                        device=torch.device("cpu"), bucketed=False)
    state.mark_prompt(ids, mask)
    hf = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=(mask != 0).int().argmax(dim=1))
    want = hf(ids, logits.clone())
    got = sampling.repetition_penalty(logits, state.seen[:4, :23], torch.tensor(1.3))
    assert torch.equal(got, want) and not state.seen[:, 4].any() and not state.seen[4:].any()


@pytest.mark.parametrize("greedy", [True, False])
def test_sample_with_penalty_equals_spec(greedy):
    for seed in range(4):
        logits, ids = _logits_and_ids(seed)
        noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(seed))
        kw = {} if greedy else dict(noise=noise)
        tok, lp = sampling.sample(logits, greedy=greedy, temperature=torch.tensor(0.8), top_p=torch.tensor(0.9),
                                  penalty=torch.tensor(1.3), seen=_mask(ids, logits.shape[1]), **kw)
        want_tok, want_lp = spec.sample(logits, greedy=greedy, temperature=0.8, top_p=0.9, penalty=1.3,
                                        sequences=ids.tolist(), **kw)
        assert tok.tolist() == want_tok.tolist(), seed
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ against HF generate and the HF loop
@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2"])
def test_k0_greedy_equals_hf_generate(vl_model, family, penalty):
    """HF generate's own greedy search with its own processor, on a ragged left-padded batch."""
    if family == "qwen2":
        model = tm.qwen2_text()
        samples = [(tm.vl_sample(None, n, seed=s)[0], None, None) for n, s in ((3, 1), (9, 2), (5, 3))]
    else:
        model, samples = vl_model, _samples()
    batch, T = tm.left_pad(samples), 10
    if family == "qwen2":
        del batch["mm_token_type_ids"]
    hf = model.generate(**batch, max_new_tokens=T, do_sample=False, repetition_penalty=penalty, pad_token_id=0,
                        eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    out = LatentEngine(model, max_batch=4, max_len=64).generate(batch, k_max=0, max_new_tokens=T,
                                                                repetition_penalty=penalty)
    assert out.tokens.tolist() == hf.tolist()
    if penalty == 1.3:  # the penalty bites: the tokens differ from plain greedy
        plain = model.generate(**batch, max_new_tokens=T, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert hf.tolist() != plain[:, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_latent_segment_then_penalised_answer_equals_hf_loop(vl_model, penalty, mode):
    """k_max > 0: the fed <|latent_end|> counts as a token, the latents count nothing."""
    K, T = 4, 8
    batch = tm.left_pad(_samples())
    kw = dict(max_new_tokens=T, latent_end_id=tm.LATENT_END, stop_ids=[20], return_logits=True,
              repetition_penalty=penalty)
    if mode == "sampled":
        kw.update(temperature=0.9, top_p=0.9)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ref = latent_loop(vl_model, batch, k=K, first_token=tm.LATENT_END, generator=gen(), pad_id=20, **kw)
    out = LatentEngine(vl_model, max_batch=4, max_len=64).generate(batch, k_max=K, generator=gen(), **kw)
    assert out.tokens.tolist() == ref.tokens.tolist()
    assert torch.equal(out.text_lengths, ref.text_lengths)
    close(out.logits, ref.logits)  # the model's logits, not penalised
    close(out.token_logprobs, ref.token_logprobs)
    # token_logprobs are read under the penalised logits
    ids = [r[m.bool()].tolist() + [tm.LATENT_END] for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    T_ = 1.0 if mode == "greedy" else 0.9
    for b in range(4):
        for t in range(int(out.text_lengths[b])):
            pen = spec.repetition_penalty(out.logits[b, t][None], [ids[b] + out.tokens[b, :t].tolist()], penalty)
            want = torch.log_softmax(pen[0].double() / T_, -1)[out.tokens[b, t]]
            assert abs(float(out.token_logprobs[b, t]) - float(want)) < 1e-4


def test_penalty_changes_the_answer_after_latents(vl_model):
    batch = tm.left_pad(_samples())
    kw = dict(k_max=4, max_new_tokens=10, latent_end_id=tm.LATENT_END)
    eng = LatentEngine(vl_model, max_batch=4, max_len=64)
    plain = eng.generate(batch, **kw).tokens
    assert plain.tolist() != eng.generate(batch, repetition_penalty=1.3, **kw).tokens.tolist()
    assert torch.equal(plain, eng.generate(batch, repetition_penalty=1.0, **kw).tokens)  # 1.0: no penalty


def test_seen_is_prompt_and_fed_tokens(vl_model):
    """After a generate: each row's seen ids = its unpadded prompt, <|latent_end|> and every
    answer token fed (all but the last sampled one); never a pad, never anything for a latent."""
    K, T = 3, 5
    batch = tm.left_pad(_samples())
    eng = LatentEngine(vl_model, max_batch=4, max_len=64)
    out = eng.generate(batch, k_max=K, max_new_tokens=T, latent_end_id=tm.LATENT_END, repetition_penalty=1.3)
    V = tm.VOCAB
    for b in range(4):
        want = set(batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()) | {tm.LATENT_END}
        want |= set(out.tokens[b, :T - 1].tolist())
        assert set(eng.state.seen[b, :V].nonzero().flatten().tolist()) == want, b


def test_grouped_rows_equal_independent_rows(vl_model):
    prompts = tm.left_pad(_samples(3))
    repeated = tm.left_pad([s for s in _samples(3) for _ in range(2)])
    kw = dict(k_max=3, max_new_tokens=6, latent_end_id=tm.LATENT_END, temperature=1.0, top_p=0.9,
              repetition_penalty=1.3, return_logits=True)
    grouped = LatentEngine(vl_model, max_batch=6, max_len=9, max_prompts=3, max_prompt_len=32)
    got = grouped.generate(prompts, group_size=2, generator=torch.Generator().manual_seed(0), **kw)
    want = LatentEngine(vl_model, max_batch=6, max_len=48).generate(
        repeated, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(got.tokens, want.tokens)
    close(got.token_logprobs, want.token_logprobs)


def test_decode_text_phase_takes_the_penalty(vl_model):
    batch = tm.left_pad(_samples())
    eng = LatentEngine(vl_model, max_batch=4, max_len=64)
    whole = eng.generate(batch, k_max=2, max_new_tokens=6, latent_end_id=tm.LATENT_END, repetition_penalty=1.3)
    eng.prefill(batch)
    eng.latent_segment(2, latent_end_id=tm.LATENT_END)
    phases = eng.decode_text(6, first_token=tm.LATENT_END, repetition_penalty=1.3)
    assert torch.equal(whole.tokens, phases.tokens)


# ------------------------------------------------------------------ graphs and bad input
@pytest.mark.parametrize("sampling_kw", [dict(), dict(temperature=0.8, top_p=0.7)], ids=["greedy", "top_p"])
def test_text_step_with_penalty_is_capture_safe(vl_model, sampling_kw):
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    with capture_checks():
        out = engine.generate(tm.left_pad(_samples(3)), k_max=2, max_new_tokens=4, latent_end_id=tm.LATENT_END,
                              stop_ids=[tm.LATENT_END], repetition_penalty=1.3,
                              generator=torch.Generator().manual_seed(0), **sampling_kw)
    assert out.tokens.shape == (3, 4)


def test_grouped_text_step_with_penalty_is_capture_safe(vl_model):
    engine = LatentEngine(vl_model, max_batch=8, max_len=8, max_prompts=3, max_prompt_len=32)
    with capture_checks():
        out = engine.generate(tm.left_pad(_samples(3)), group_size=2, k_max=3, max_new_tokens=3,
                              latent_end_id=tm.LATENT_END, temperature=1.0, repetition_penalty=0.8,
                              generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (6, 3)


def test_graph_key_says_whether_the_penalty_is_on(vl_model, monkeypatch):
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    keys = []
    run = engine._graphs.run
    monkeypatch.setattr(engine._graphs, "run", lambda key, fn: (keys.append(key), run(key, fn)))
    batch = tm.left_pad(_samples(2))
    engine.generate(batch, k_max=0, max_new_tokens=3)
    engine.generate(batch, k_max=0, max_new_tokens=3, repetition_penalty=1.2)
    engine.generate(batch, k_max=0, max_new_tokens=3, repetition_penalty=1.5)  # same graph: a buffer value
    text = sorted({k for k in keys if k[0] == "text"})
    assert len(text) == 2 and {k[4] for k in text} == {False, True}


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1.1", None])
def test_bad_penalty_is_refused_before_anything_runs(vl_model, bad):
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    batch = tm.left_pad(_samples(2))
    with pytest.raises(ValueError, match="repetition_penalty must be a finite float > 0"):
        engine.generate(batch, k_max=2, max_new_tokens=3, latent_end_id=tm.LATENT_END, repetition_penalty=bad)
    assert engine.state.batch == 0  # no prefill ran
    engine.prefill(batch)
    with pytest.raises(ValueError, match="repetition_penalty"):
        engine.decode_text(3, repetition_penalty=bad)
    with pytest.raises(ValueError, match="repetition_penalty"):
        latent_loop(vl_model, batch, k=0, max_new_tokens=2, repetition_penalty=bad)


def test_hf_loop_needs_the_prompt_ids_for_a_penalty(vl_model):
    from medlvr.models import hf

    p = hf.prompt_inputs(vl_model, tm.left_pad(_samples(2)))
    del p["input_ids"]
    with pytest.raises(ValueError, match="repetition_penalty needs the prompt's input_ids"):
        latent_loop(vl_model, p, k=0, max_new_tokens=2, repetition_penalty=1.3)
    latent_loop(vl_model, p, k=0, max_new_tokens=2)  # no penalty: no ids needed


@pytest.mark.cuda
@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.7])
def test_penalty_on_cuda_equals_hf_processor_bit_for_bit(penalty):
    """On CUDA torch divides by a Python float as a * (1 / b): the engine's ``inverse`` path."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from medlvr.engine.state import penalty_inverse

    for seed in range(4):
        logits, ids = _logits_and_ids(seed, B=8, V=4096, S=300)
        logits, ids = logits.cuda(), ids.cuda()
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = sampling.repetition_penalty(logits, _mask(ids.cpu(), 4096).cuda(), torch.tensor(penalty).cuda(),
                                          torch.tensor(penalty_inverse(penalty)).cuda())
        assert torch.equal(got, want), seed


@pytest.mark.cuda
def test_cuda_graphs_with_penalty_equal_eager_and_hf_generate():
    model = tm.qwen2_5_vl().cuda()
    batch = {k: v.cuda() for k, v in tm.left_pad(_samples()).items()}
    kw = dict(k_max=0, max_new_tokens=8, repetition_penalty=1.3)
    graphed = LatentEngine(model, max_batch=4, max_len=64)
    eager = LatentEngine(model, max_batch=4, max_len=64, use_cuda_graphs=False)
    a, b = graphed.generate(batch, **kw), graphed.generate(batch, **kw)
    c = eager.generate(batch, **kw)
    hf = model.generate(**batch, max_new_tokens=8, do_sample=False, repetition_penalty=1.3, pad_token_id=0,
                        eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert a.tokens.tolist() == hf.tolist()
    s = dict(temperature=0.9, top_p=0.9, k_max=3, latent_end_id=tm.LATENT_END, max_new_tokens=8,
             repetition_penalty=1.3)
    g1 = graphed.generate(batch, generator=torch.Generator("cuda").manual_seed(0), **s)
    g2 = eager.generate(batch, generator=torch.Generator("cuda").manual_seed(0), **s)
    assert torch.equal(g1.tokens, g2.tokens)
