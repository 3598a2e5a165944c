"""The exit rules of the drop-in presets (medlvr/engine/exit_rules.py): LVR's distance
to a learned end embedding (MSE of the fed latent, and the L2 / next-latent option),
Coconut's token count, the end-token test at <start>, and Mirage's batch-global scope. The engine against
the plain-HF loop (medlvr/engine/hf_loop.py) on a ragged batch, fp32, per sample;
and their bad input."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.engine import LatentEngine
from medlvr.engine.hf_loop import latent_loop

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


def test_end_distance_lvr_default_exits_after_feeding(vl_model, batch):
    """LVR's rule (exit_rules defaults): MSE of the latent just fed to the end embedding;
    the row leaves after feeding it."""
    fixed = latent_loop(vl_model, batch, k=K, max_new_tokens=0)
    target = fixed.latents[0, 3].clone()  # fed by sample 0 at step 3
    out = _both(vl_model, batch, exit="end_distance", exit_threshold=1e-3, end_embedding=target)
    assert out.num_latent.tolist() == [4, K, K]


def test_end_distance_l2_next_option(vl_model, batch):
    """medlvr's option: L2 distance of the next latent, which is then not fed."""
    fixed = latent_loop(vl_model, batch, k=K, max_new_tokens=0)
    target = fixed.latent_mu[0, 3].clone()
    out = _both(vl_model, batch, exit="end_distance", exit_threshold=1e-3, end_embedding=target,
                exit_distance="l2", exit_distance_on="next")
    assert out.num_latent.tolist() == [3, K, K]


def test_end_distance_default_threshold_is_lvr_0_02_mse(vl_model, batch):
    fixed = latent_loop(vl_model, batch, k=K, max_new_tokens=0)
    # every coordinate off by sqrt(0.015): MSE 0.015 < 0.02, while the L2 distance is
    # sqrt(0.015 * 64) ~ 0.98, far above 0.02
    target = fixed.latents[1, 2] + 0.015 ** 0.5
    out = _both(vl_model, batch, exit="end_distance", end_embedding=target)
    assert out.num_latent.tolist() == [K, 3, K]
    l2 = _both(vl_model, batch, exit="end_distance", end_embedding=target, exit_distance="l2")
    assert l2.num_latent.tolist() == [K, K, K]


@pytest.mark.parametrize("counts", [[2, 5, 1], [0, 3, 5]])
def test_count_runs_each_row_its_own_steps(vl_model, batch, counts):
    out = _both(vl_model, batch, exit="count", latent_counts=counts)
    assert out.num_latent.tolist() == counts
    for b, c in enumerate(counts):
        assert torch.all(out.latents[b, c:] == 0) and (c == 0 or bool(out.latents[b, c - 1].abs().sum() > 0))


def _end_logits(model, batch):
    """lm_head(h)[end] of every row at <start> (h_{-1}) and after each fixed step."""
    fixed = latent_loop(model, batch, k=K, max_new_tokens=0)
    h = torch.cat([fixed.latent_hidden[:, :1], fixed.step_hidden], dim=1)  # (B, K + 1, D)
    with torch.no_grad():
        return model.lm_head(h)[..., tm.LATENT_END]


def test_check_start_lets_a_row_run_zero_steps(vl_model, batch):
    logits = _end_logits(vl_model, batch)
    thr = float(logits[1, 0]) - 1e-4  # row 1 fires at <start>
    keep = logits[:, 0] <= thr
    out = _both(vl_model, batch, exit="stop_logit", exit_threshold=thr, exit_check_start=True)
    assert int(out.num_latent[1]) == 0 and torch.all(out.latents[1] == 0)
    without = _both(vl_model, batch, exit="stop_logit", exit_threshold=thr)
    assert int(without.num_latent[1]) >= 1 and bool(keep[0]) and bool(keep[2])


def _mirage_count(fires: torch.Tensor, k: int) -> int:
    """Mirage's batch exit, written from its loop (generation/utils.py _sample): firings
    are counted row by row and test by test; the batch leaves at the test where the count
    reaches B; test 0 is <start>'s own. Returns the latent steps run."""
    n = 0
    for j in range(fires.shape[1]):
        for b in range(fires.shape[0]):
            n += int(fires[b, j])
            if n == fires.shape[0]:
                return j
        if j == k:
            break
    return k


def test_batch_scope_counts_every_firing(vl_model, batch):
    """A row that fires at two tests counts twice: the batch can leave before every row
    has fired (Mirage's latent_end_num == cur_bs)."""
    logits = _end_logits(vl_model, batch)
    thr = 0.5  # on this model only row 1 fires, at tests 2, 3 and 4: it alone completes the count
    fires = logits > thr
    assert fires.sum(dim=1).tolist() == [0, 3, 0] and fires[1, 2:5].all()
    out = _both(vl_model, batch, exit="stop_logit", exit_threshold=thr, exit_scope="batch",
                exit_check_start=True)
    n = _mirage_count(fires, K)
    assert out.num_latent.tolist() == [n] * 3
    assert n == 4


BAD = [
    (dict(exit="count", exit_scope="batch", latent_counts=[1, 2, 3]), "exit_scope='batch'"),
    (dict(exit="cosine", exit_check_start=True), "exit_check_start=True needs exit='stop_logit'"),
    (dict(exit="stop_logit", after_exit="mirage"), "after_exit='mirage' needs"),
    (dict(exit="stop_logit", exit_scope="batch", after_exit="mirage"), "needs latent_pad_id"),
    (dict(exit="end_distance", end_embedding=torch.zeros(64), exit_distance="cos"), "exit_distance must be one of"),
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
