"""The production exit rules (medlvr/engine/exit_rules.py: stop_mask, batch_exit,
mirage_after_tokens, the modes and defaults checked() fills in) against their row-by-row
spec (medlvr/reference/exit_rules.py) on random inputs, over every mode.

Inputs are built so that every test fires on some rows and not on others (asserted), and
the scores lie far from the thresholds compared with fp32 rounding (the spec computes in
fp64), so a disagreement is a rule that differs, not rounding."""
from __future__ import annotations

import itertools

import pytest
import torch

from medlvr.engine import exit_rules
from medlvr.reference import exit_rules as spec

B, D, V, K = 9, 16, 11, 5
SEEDS = range(6)


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # per-row scales spread the scores (cosines near 1 and far from it, distances small and large)
    scale = torch.linspace(0.05, 2.0, B)[torch.randperm(B, generator=g)][:, None]
    end_embedding = randn(D)
    mu = end_embedding + 0.3 * randn(B, D)  # so that mu_next lands near the end embedding on some rows
    lm_head = torch.nn.Linear(D, V)
    stop_head = torch.nn.Linear(D, 1)
    with torch.no_grad():
        for p in (*lm_head.parameters(), *stop_head.parameters()):
            p.copy_(randn(*p.shape))
    h = randn(B, D)
    # the end token: row 0's greedy token, so that the argmax test fires on some rows
    end_id = int(lm_head(h[:1]).argmax())
    return dict(h=h, mu=mu, mu_next=mu + scale * randn(B, D), fed=end_embedding + scale * randn(B, D),
                end_embedding=end_embedding, lm_head=lm_head, stop_head=stop_head, end_id=end_id,
                num_latent=torch.randint(0, K + 1, (B,), generator=g),
                counts=torch.randint(0, K + 1, (B,), generator=g))


# (exit, checked() arguments, threshold): one case per mode (end_distance in all four variants)
CASES = [("fixed", {}, None), ("cosine", {}, 0.8), ("cosine", {}, None),
         ("stop_logit", {"has_stop_head": True}, 0.3), ("stop_logit", {}, 0.5), ("stop_logit", {}, None),
         *[("end_distance", {"exit_distance": d, "exit_distance_on": on}, 1.0 if d == "mse" else 4.0)
           for d, on in itertools.product(("mse", "l2"), ("fed", "next"))],
         ("count", {}, None)]


def _rule(exit, kw, threshold, x):
    extra = {}
    if exit == "end_distance":
        extra["end_embedding"] = x["end_embedding"]
    if exit == "count":
        extra.update(latent_counts=x["counts"].tolist(), batch=B)
    if exit == "stop_logit":
        extra.update(latent_end_id=x["end_id"], vocab=V)
    return exit_rules.checked(K, exit=exit, exit_threshold=threshold, hidden_size=D, **kw, **extra)


@pytest.mark.parametrize("exit, kw, threshold", CASES, ids=lambda v: str(v))
def test_stop_mask_equals_spec(exit, kw, threshold):
    fired = []
    for seed in SEEDS:
        x = _inputs(seed)
        rule = _rule(exit, kw, threshold, x)
        mode = spec.stop_mode(exit, threshold=threshold, has_stop_head=kw.get("has_stop_head", False))
        assert rule.mode == mode
        want_threshold = threshold if threshold is not None else spec.DEFAULT_THRESHOLD.get(mode, 0.0)
        assert rule.threshold == pytest.approx(want_threshold, abs=0)
        with torch.no_grad():
            got, got_tok = exit_rules.stop_mask(
                rule, threshold=torch.tensor(rule.threshold), fed=x["fed"], mu=x["mu"], mu_next=x["mu_next"],
                h=x["h"], lm_head=x["lm_head"], end_id=torch.tensor([x["end_id"]]), stop_head=x["stop_head"],
                num_latent=x["num_latent"], counts=torch.tensor(rule.counts) if rule.counts else None,
                end_embedding=rule.end_embedding)
            want, want_tok = spec.stop_rows(
                mode, threshold=want_threshold, h=x["h"], fed=x["fed"], mu=x["mu"], mu_next=x["mu_next"],
                lm_head=x["lm_head"], end_id=x["end_id"], stop_head=x["stop_head"],
                num_latent=x["num_latent"].tolist(), counts=x["counts"].tolist(), end_embedding=x["end_embedding"],
                distance=kw.get("exit_distance", "mse"), distance_on=kw.get("exit_distance_on", "fed"))
        if mode == "fixed":
            assert got is None and want is None
            continue
        assert got.tolist() == want.tolist(), (seed, got, want)
        if mode == "argmax":
            assert got_tok.tolist() == want_tok.tolist()
        else:
            assert got_tok is None and want_tok is None
        fired += want.tolist()
    if exit != "fixed":
        assert any(fired) and not all(fired), "the inputs must make the test fire on some rows only"


def test_batch_exit_equals_spec():
    g = torch.Generator().manual_seed(0)
    outcomes = set()
    for trial in range(300):
        n = int(torch.randint(1, 8, (1,), generator=g))
        stop = torch.rand(n, generator=g) < 0.6
        active = torch.rand(n, generator=g) < 0.8
        start = int(torch.randint(0, n + 1, (1,), generator=g))
        fired = torch.tensor(start)
        exits, first = exit_rules.batch_exit(stop, active, fired, torch.tensor(n))
        want_exits, want_first, want_count = spec.batch_exit(stop.tolist(), active.tolist(), start, n)
        assert (bool(exits), int(first), int(fired)) == (want_exits, want_first, want_count), trial
        outcomes.add(want_exits)
    assert outcomes == {True, False}


def test_mirage_after_tokens_equals_spec():
    g = torch.Generator().manual_seed(1)
    end_id, pad_id = 3, 7
    for trial in range(100):
        n = int(torch.randint(1, 8, (1,), generator=g))
        tok = torch.randint(0, 10, (n,), generator=g)
        is_end = tok == end_id
        first = int(torch.randint(0, n + 1, (1,), generator=g))
        got = exit_rules.mirage_after_tokens(tok, is_end, torch.tensor(first), torch.tensor([end_id]),
                                             torch.tensor([pad_id]))
        want = spec.mirage_after_tokens(tok.tolist(), is_end.tolist(), first, end_id, pad_id)
        assert got.tolist() == want.tolist(), trial


def test_spec_batch_exit_mirage_example():
    """Mirage with 3 rows, counting from 1: rows 0 and 2 fire, so the count reaches 3 at row 2;
    the rows before it were still in latent mode and get the pad id, row 2 keeps its token."""
    leaves, first, count = spec.batch_exit([True, False, True], [True, True, True], 1, 3)
    assert (leaves, first, count) == (True, 2, 3)
    assert spec.mirage_after_tokens([5, 8, 6], [False, True, False], first, end_id=8, pad_id=9).tolist() == [9, 8, 6]
