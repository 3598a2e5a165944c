"""Sampling: medlvr/engine/sampling.py equals its row-by-row spec (medlvr/reference/sampling.py),
the exponential-race sampler draws from softmax(logits / T) (restricted to the top-p nucleus),
and the engine's sampled answers are reproducible per generator."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.engine import LatentEngine
from medlvr.engine.sampling import sample, top_p_filter
from medlvr.reference import sampling as spec


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # mass before each token in descending order: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95
    kept = top_p_filter(probs, torch.tensor(0.75))
    assert torch.equal(kept, probs * torch.tensor([[0, 1, 0, 1]]))
    kept = top_p_filter(probs, torch.tensor(0.85))
    assert torch.equal(kept, probs * torch.tensor([[0, 1, 1, 1]]))
    # the most likely token survives any top_p
    assert torch.equal(top_p_filter(probs, torch.tensor(1e-6)), probs * torch.tensor([[0, 1, 0, 0]]))


def _logits(seed: int, B: int = 6, V: int = 13) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(B, V, generator=g)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.999, 1.0])
def test_top_p_filter_equals_spec(top_p):
    for seed in range(5):
        probs = torch.softmax(_logits(seed), -1)
        got = top_p_filter(probs, torch.tensor(top_p))
        want = spec.top_p_filter(probs, top_p)
        assert torch.equal(got, want), seed  # kept entries are the inputs themselves, the rest 0


@pytest.mark.parametrize("temperature, top_p", [(1.0, None), (0.7, None), (1.3, 0.6), (1.0, 0.9)])
def test_sample_equals_spec(temperature, top_p):
    for seed in range(5):
        logits = _logits(seed)
        noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(100 + seed))
        tok, lp = sample(logits, greedy=False, temperature=torch.tensor(temperature),
                         top_p=None if top_p is None else torch.tensor(top_p), noise=noise)
        want_tok, want_lp = spec.sample(logits, greedy=False, temperature=temperature, top_p=top_p, noise=noise)
        assert tok.tolist() == want_tok.tolist(), seed
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)


def test_greedy_sample_equals_spec():
    for seed in range(5):
        logits = _logits(seed)
        tok, lp = sample(logits, greedy=True)
        want_tok, want_lp = spec.sample(logits, greedy=True)
        assert tok.tolist() == want_tok.tolist()
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, None), (0.5, None), (1.0, 0.7)])
def test_sampler_distribution(temperature, top_p):
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    n = 40000
    g = torch.Generator().manual_seed(0)
    noise = torch.empty(n, 5).exponential_(generator=g)
    tok, lp = sample(logits.expand(n, 5), greedy=False, temperature=torch.tensor(temperature),
                     top_p=None if top_p is None else torch.tensor(top_p), noise=noise)
    p = torch.softmax(logits / temperature, -1)
    torch.testing.assert_close(lp, p.log()[tok])
    if top_p is not None:
        p = top_p_filter(p[None], torch.tensor(top_p))[0]
        p = p / p.sum()
    freq = torch.bincount(tok, minlength=5).float() / n
    # 4 sigma of a binomial proportion at n = 40000 is < 0.01
    assert (freq - p).abs().max() < 0.01, (freq, p)


def test_greedy_sampler():
    logits = torch.tensor([[0.1, 3.0, -2.0], [5.0, 1.0, 4.9]])
    tok, lp = sample(logits, greedy=True)
    assert tok.tolist() == [1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


@pytest.fixture(scope="module")
def engine():
    return LatentEngine(tm.qwen2_5_vl(), max_batch=2, max_len=64)


def _run(engine, **kw):
    batch = tm.left_pad([tm.vl_sample((2, 4), 3, seed=1), tm.vl_sample(None, 5, seed=2)])
    return engine.generate(batch, k_max=2, max_new_tokens=8, latent_end_id=tm.LATENT_END, return_logits=True, **kw)


def test_engine_sampling_reproducible_and_logprobs(engine):
    a = _run(engine, temperature=0.8, generator=torch.Generator().manual_seed(1))
    b = _run(engine, temperature=0.8, generator=torch.Generator().manual_seed(1))
    c = _run(engine, temperature=0.8, generator=torch.Generator().manual_seed(2))
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.tokens.tolist() != c.tokens.tolist()
    # log-probs of the sampled tokens under log_softmax(logits / T)
    lp = torch.log_softmax(a.logits / 0.8, -1).gather(-1, a.tokens[..., None])[..., 0]
    torch.testing.assert_close(a.token_logprobs, lp, rtol=1e-5, atol=1e-5)


def test_tiny_top_p_is_greedy(engine):
    greedy = _run(engine)
    nucleus = _run(engine, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert nucleus.tokens.tolist() == greedy.tokens.tolist()
