"""The exit rules added for drop-in presets (issue 15): LVR's distance to a learned end
embedding, Coconut's token count, and Mirage's batch-global scope. The engine against
the plain-HF loop (medlvr/reference/latent_loop.py) on a ragged batch, fp32, per sample;
and their bad input."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.engine import LatentEngine
from medlvr.reference.latent_loop import latent_loop

K, T = 5, 4
SAMPLES = [((4, 6), 3, 1), ((2, 2), 6, 2), (None, 4, 3)]


def close(actual, expected, rel=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(1.0, float(expected.abs().max())))


@pytest.fixture(scope="module")
def vl_model():
    return tm.qwen2_5_vl()


@pytest.fixture(scope="module")
def batch():
    return tm.left_pad([tm.vl_sample(hw, n, seed=s) for hw, n, s in SAMPLES])


def _both(model, batch, **exit_kw):
    ref = latent_loop(model, batch, k=K, max_new_tokens=T, first_token=tm.LATENT_END, latent_end_id=tm.LATENT_END,
                      stop_ids=[tm.LATENT_END], **exit_kw)
    out = LatentEngine(model, max_batch=4, max_len=64).generate(
        batch, k_max=K, max_new_tokens=T, latent_end_id=tm.LATENT_END, stop_ids=[tm.LATENT_END], **exit_kw)
    assert out.num_latent.tolist() == ref.num_latent.tolist()
    close(out.latents, ref.latents)
    close(out.latent_hidden, ref.latent_hidden)
    assert out.tokens.tolist() == ref.tokens.tolist()
    close(out.token_logprobs, ref.token_logprobs)
    return out


def test_end_distance_exits_per_sample(vl_model, batch):
    fixed = latent_loop(vl_model, batch, k=K, max_new_tokens=0)
    # The end embedding is sample 0's latent mu_3: sample 0 stops after step 2 (its next
    # latent is at distance 0), the others run every step.
    target = fixed.latent_mu[0, 3].clone()
    out = _both(vl_model, batch, exit="end_distance", exit_threshold=1e-3, end_embedding=target)
    assert out.num_latent.tolist() == [3, K, K]


def test_end_distance_default_threshold_is_lvr_0_02(vl_model, batch):
    fixed = latent_loop(vl_model, batch, k=K, max_new_tokens=0)
    target = fixed.latent_mu[1, 2] + 0.015 / fixed.latent_mu.shape[-1] ** 0.5  # at distance 0.015 < 0.02
    out = _both(vl_model, batch, exit="end_distance", end_embedding=target)
    assert out.num_latent.tolist() == [K, 2, K]


@pytest.mark.parametrize("counts", [[2, 5, 1], [0, 3, 5]])
def test_count_runs_each_row_its_own_steps(vl_model, batch, counts):
    out = _both(vl_model, batch, exit="count", latent_counts=counts)
    assert out.num_latent.tolist() == counts
    for b, c in enumerate(counts):
        assert torch.all(out.latents[b, c:] == 0) and (c == 0 or bool(out.latents[b, c - 1].abs().sum() > 0))


def test_batch_scope_runs_until_every_row_fired(vl_model, batch):
    # count as the rule makes each row fire at a known step: with the batch scope every
    # row runs max(counts) steps; per sample each runs its own.
    counts = [2, 4, 1]
    out = _both(vl_model, batch, exit="count", latent_counts=counts, exit_scope="batch")
    assert out.num_latent.tolist() == [4, 4, 4]
    per_sample = _both(vl_model, batch, exit="count", latent_counts=[4, 4, 4])
    close(out.latents, per_sample.latents)  # all rows exiting together: the scopes agree
    assert out.tokens.tolist() == per_sample.tokens.tolist()


def test_batch_scope_with_end_distance(vl_model, batch):
    fixed = latent_loop(vl_model, batch, k=K, max_new_tokens=0)
    out = _both(vl_model, batch, exit="end_distance", exit_threshold=1e-3, end_embedding=fixed.latent_mu[0, 2],
                exit_scope="batch")
    # only row 0 ever fires, so the batch-global segment runs k_max for everyone
    assert out.num_latent.tolist() == [K, K, K]


BAD = [
    (dict(exit="count"), "latent_counts"),
    (dict(exit="count", latent_counts=[1, 2]), "latent_counts must hold 3"),
    (dict(exit="count", latent_counts=[1, 2, K + 1]), r"latent_counts entries must lie in \[0, k_max"),
    (dict(exit="end_distance"), "end_embedding"),
    (dict(exit="end_distance", end_embedding=torch.zeros(3)), r"end_embedding must have shape \(64,\)"),
    (dict(exit="end_distance", end_embedding=torch.zeros(64), exit_threshold=0.0), "must be > 0"),
    (dict(exit="fixed", exit_scope="global"), "exit_scope must be one of"),
]


@pytest.mark.parametrize("kw,match", BAD)
def test_bad_exit_arguments(vl_model, batch, kw, match):
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    with pytest.raises(ValueError, match=match):
        engine.generate(batch, k_max=K, max_new_tokens=2, latent_end_id=tm.LATENT_END, **kw)
    assert engine.state.batch == 0  # nothing ran
