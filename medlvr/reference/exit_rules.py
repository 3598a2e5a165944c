"""The latent segment's exit rules, stated row by row: the executable spec of
medlvr/engine/exit_rules.py (``stop_mask``, ``batch_exit``, ``mirage_after_tokens``, the
defaults ``checked`` fills in), checked against it by tests/engine/test_exit_rules_spec.py.

Written from the rules' definitions (docs/engine.md, the production module's docstring),
not from its tensor code: one Python loop over the rows, each test a plain formula in fp64
(the module calls in their own dtype), so that nothing is shared with what it checks.

Per row b, after latent step t (h = the step's post-norm output h_t, fed = z_t the latent
just fed, mu = mu_t its mean, mu_next = feedback(h_t)):

    fixed          never stops
    cosine         cos(mu_next, mu) > threshold        (a zero vector has cosine 0)
    head           stop_head(h) > threshold            (the model's latent_stop_head, one logit)
    logit          lm_head(h)[end] > threshold
    argmax         argmax_i lm_head(h)_i == end        (also returns that argmax token)
    end_distance   d(v, e) < threshold, v = fed ("fed") or mu_next ("next"), e the end embedding,
                   d = mean_i (v_i - e_i)^2 ("mse") or sqrt(sum_i (v_i - e_i)^2) ("l2")
    count          num_latent >= counts               (steps run so far, this one included)

Mirage's batch scope: every firing of a still-active row is counted in row order onto the
count carried from earlier tests; the batch leaves at the test where the count reaches the
batch size, and ``first`` is the row whose firing reached it (B when it was not reached).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# The rule's default thresholds (docs/engine.md's table): cosine 0.99; LVR's end distance
# 0.02 (src/model/qwen_lvr_model.py, lvr_end_threshold); the logit tests compare with 0.
DEFAULT_THRESHOLD = {"cosine": 0.99, "end_distance": 0.02, "head": 0.0, "logit": 0.0}


def stop_mode(exit: str, *, threshold: float | None, has_stop_head: bool) -> str:
    """Which test an ``exit`` argument means. "stop_logit" is the model's wish to emit the
    end token: its latent_stop_head when it has one, else the end token's logit against a
    given threshold, else (no threshold) the end token being the argmax."""
    if exit != "stop_logit":
        return exit
    if has_stop_head:
        return "head"
    return "argmax" if threshold is None else "logit"


def _row(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.double().reshape(-1)]


def _cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / norm if norm > 0 else 0.0


def _distance(v: list[float], e: list[float], metric: str) -> float:
    sq = [(x - y) ** 2 for x, y in zip(v, e)]
    return sum(sq) / len(sq) if metric == "mse" else math.sqrt(sum(sq))


def stop_rows(mode: str, *, threshold: float, h: torch.Tensor, fed: torch.Tensor | None = None,
              mu: torch.Tensor | None = None, mu_next: torch.Tensor | None = None,
              lm_head: torch.nn.Module | None = None, end_id: int | None = None,
              stop_head: torch.nn.Module | None = None, num_latent: Sequence[int] | None = None,
              counts: Sequence[int] | None = None, end_embedding: torch.Tensor | None = None,
              distance: str = "mse", distance_on: str = "fed") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(stop (B,) bool, None for "fixed"; the argmax tokens (B,) int64 for "argmax", else None)
    of one test over the B rows of h (B, D), each row tested on its own."""
    if mode == "fixed":
        return None, None
    B = h.shape[0]
    stop, tokens = [], []
    for b in range(B):
        if mode == "cosine":
            fires = _cosine(_row(mu_next[b]), _row(mu[b])) > threshold
        elif mode == "head":
            fires = float(stop_head(h[b:b + 1]).double().reshape(())) > threshold
        elif mode == "logit":
            fires = float(lm_head(h[b:b + 1]).double()[0, end_id]) > threshold
        elif mode == "argmax":
            logits = _row(lm_head(h[b:b + 1]))
            tok = max(range(len(logits)), key=lambda i: logits[i])  # the first of equal maxima
            tokens.append(tok)
            fires = tok == end_id
        elif mode == "end_distance":
            v = fed[b] if distance_on == "fed" else mu_next[b]
            fires = _distance(_row(v), _row(end_embedding), distance) < threshold
        elif mode == "count":
            fires = int(num_latent[b]) >= int(counts[b])
        else:
            raise ValueError(f"mode must be one of fixed, cosine, head, logit, argmax, end_distance, count, "
                             f"got {mode!r}")
        stop.append(fires)
    toks = torch.tensor(tokens, dtype=torch.long) if mode == "argmax" else None
    return torch.tensor(stop, dtype=torch.bool), toks


def batch_exit(stop: Sequence[bool], active: Sequence[bool], fired_count: int,
               batch_size: int) -> tuple[bool, int, int]:
    """Mirage's batch-global exit at one test: (the batch leaves now, first, the new count).

    Mirage's ``_sample`` walks the rows in order and counts each row still in latent mode
    whose test fired; the batch leaves when the count reaches the batch size (a row may be
    counted at several tests). ``first`` is the row at which it was reached, B if it was not.
    A batch with no active row has left already and does not leave again."""
    count, first = int(fired_count), None
    for b, (fires, on) in enumerate(zip(stop, active)):
        if on and fires:
            count += 1
        if first is None and count >= batch_size:
            first = b
    leaves = count >= batch_size and any(bool(a) for a in active)
    return leaves, len(stop) if first is None else first, count


def mirage_after_tokens(tok: Sequence[int], is_end: Sequence[bool], first: int, end_id: int,
                        pad_id: int) -> torch.Tensor:
    """The ids Mirage's loop has written into the rows at the exit test (fed next), per row:
    the end token where the row's own token is the end token; else the latent pad id in the
    rows before ``first`` (still in latent mode when the loop reached them, before the row
    that completed the count); else the row's own token."""
    out = []
    for b, (t, end) in enumerate(zip(tok, is_end)):
        out.append(end_id if end else (pad_id if b < first else int(t)))
    return torch.tensor(out, dtype=torch.long)
