"""A stage-1 loss term and a VLPO reward added from outside the package: one registration each,
no edit of medlvr/. The training loop then optimises them and reports them by name."""
from __future__ import annotations

import json

import pytest
import torch

from medlvr.data.records import load_jsonl
from medlvr.data.synth import synthesize
from medlvr.models import build_default
from medlvr.policy import build_trainable
from medlvr.train.loop import LoopConfig
from medlvr.train.sft import LOSS_TERMS, Stage1Config, TermInputs, register_loss_term, stage1_loss, train_stage1, \
    unregister_loss_term
from medlvr.train.vlpo import REWARDS, VLPOConfig, outcome_rewards, register_reward, reward_weights, train_vlpo, \
    unregister_reward, vlpo_loop


def _latent_norm(x: TermInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy term: the mean squared norm of each sample's fed-back latent states."""
    value = x.out.latent_hidden.float().pow(2).sum(-1).mean(-1)
    return value, torch.ones_like(value)


@pytest.fixture
def toy_term():
    register_loss_term("latent_norm", _latent_norm, weight=0.25)
    yield
    unregister_loss_term("latent_norm")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    paths = synthesize(tmp_path_factory.mktemp("data") / "d", n=8, seed=0, split_fractions=(1.0, 0.0, 0.0))
    return load_jsonl(paths["train"])[0]


def test_a_registered_loss_term_enters_the_loss_at_its_weight(toy_term, records):
    from medlvr.data.collate import collate
    from medlvr.policy import policy_tokens

    model, processor = build_default(seed=0)
    cfg = Stage1Config(k_latent=2, roi_weight=0.5)
    lm = build_trainable(model, processor, cfg)
    batch = collate(records[:4], processor, k_latent=2, with_answer=True,
                    latent_token_ids=policy_tokens(processor).latent)
    loss, metrics = stage1_loss(lm, batch, cfg)
    out = lm(batch)
    toy = out.latent_hidden.float().pow(2).sum(-1).mean(-1)
    roi_value, _ = LOSS_TERMS["roi"].fn(TermInputs(lm=lm, batch=batch, out=out, cfg=cfg))
    want = out.ce.mean() + 0.5 * roi_value.mean() + 0.25 * toy.mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["latent_norm"], toy.mean(), rtol=1e-5, atol=1e-6)
    assert float(metrics["latent_norm_frac"]) == 1.0
    # the gradient of the toy term reaches the policy: its weight changes the gradient
    loss.backward()
    g_with = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad(set_to_none=True)
    unregister_loss_term("latent_norm")
    try:
        stage1_loss(lm, batch, cfg)[0].backward()
    finally:
        register_loss_term("latent_norm", _latent_norm, weight=0.25)
    assert any(not torch.equal(g_with[n], p.grad) for n, p in lm.named_parameters() if p.grad is not None)


def test_the_loop_reports_a_registered_term_by_name(toy_term, records, tmp_path):
    model, processor = build_default(seed=0)
    lm = build_trainable(model, processor, Stage1Config(k_latent=2))
    last = train_stage1(lm, processor, records, LoopConfig(out_dir=str(tmp_path), max_steps=2, batch_size=4,
                                                           progress=False))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["latent_norm"] > 0 and r["latent_norm_frac"] == 1.0 for r in rows)
    assert "latent_norm" in last and "roi" in last


def test_loss_term_registration_names_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        register_loss_term("ce", _latent_norm)
    with pytest.raises(ValueError, match="already registered"):
        register_loss_term("roi", _latent_norm)
    with pytest.raises(ValueError, match="weight"):
        register_loss_term("x", _latent_norm, weight=-1.0)
    with pytest.raises(ValueError, match="no loss term"):
        unregister_loss_term("nope")


def _brevity(text: str, stopped: bool, record, cfg) -> float:
    """A toy reward: 1 for an answer of at most two words that stopped."""
    return float(stopped and 0 < len(text.split()) <= 2)


@pytest.fixture
def toy_reward():
    register_reward("brevity", _brevity, weight=lambda cfg: 0.5)
    yield
    unregister_reward("brevity")


def test_a_registered_reward_is_summed_at_its_weight(toy_reward):
    rec = type("R", (), {"answer": "left lung", "options": None})()
    out = outcome_rewards(["left lung", "the left lung it is"], [True, True], [rec, rec],
                          weights=reward_weights(VLPOConfig(w_format=0.0)))
    assert out["brevity"] == [1.0, 0.0]
    assert out["reward"] == [1.0 + 0.5, 0.0]  # accuracy 1 + brevity 0.5 / wrong and long
    assert list(REWARDS)[-1] == "brevity"


def test_vlpo_reports_a_registered_reward(toy_reward, records, tmp_path):
    model, processor = build_default(seed=0)
    cfg = VLPOConfig(n_rollouts=2, k_latent=2, batch_prompts=2, max_new_tokens=3, kl_beta=0.0,
                     loop=vlpo_loop(max_steps=1, lr=1e-3, out_dir=str(tmp_path), progress=False))
    hist = train_vlpo(model, processor, records, cfg)
    assert 0.0 <= hist[0]["brevity"] <= 1.0 and {"accuracy", "format", "reward"} <= set(hist[0])


def test_reward_registration_names_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        register_reward("reward", _brevity)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy", _brevity)
    with pytest.raises(TypeError, match="fn"):
        register_reward("x", 3)
    with pytest.raises(ValueError, match="weights"):
        outcome_rewards(["a"], [True], [object()], weights={"nope": 1.0})
