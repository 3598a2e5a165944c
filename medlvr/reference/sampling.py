"""Token sampling stated row by row: the executable spec of medlvr/engine/sampling.py
(``top_p_filter``, ``sample``), checked against it by tests/engine/test_sampling.py.

Written from the definitions, one Python loop over the rows with fp64 sums:

- top-p (nucleus, Holtzman et al. 2020): sort a row's probabilities in descending order and
  keep each token whose preceding mass (the sum of the tokens before it in that order) is
  below top_p; the most likely token is always kept. Kept tokens keep their probability
  (no renormalisation), the others get 0.
- the exponential race: with E_i independent Exp(1) draws, argmax_i p_i / E_i is token i
  with probability p_i / sum_j p_j (E_i / p_i ~ Exp(p_i), and the smallest of independent
  exponentials is the i-th with probability rate_i / sum of the rates), so the (filtered,
  unnormalised) p can be used as it is.
- the log-prob of a sampled token is read under log_softmax(logits / T), the policy's own
  distribution before top-p; a greedy token (argmax logits) under log_softmax(logits).
- the repetition penalty (Keskar et al. 2019, CTRL; HF's ``repetition_penalty``): every
  token id that occurs in the row's sequence so far, counted once however often it occurs,
  has its logit x replaced by x / penalty if x > 0 and by x * penalty if x < 0 (0 stays 0);
  tokens that do not occur keep their logit. It is applied to the logits before anything
  else (temperature, top-p, the argmax), and "logits" above then mean the penalised ones.
"""
from __future__ import annotations

import math

import torch


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (torch.argmax's choice among equal maxima)."""
    return max(range(len(values)), key=lambda i: values[i])


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, V) -> (B, V) in probs' dtype: each row's nucleus kept, the rest zero."""
    out = torch.zeros_like(probs)
    for b in range(probs.shape[0]):
        row = [float(p) for p in probs[b].double()]
        mass = 0.0
        for i in sorted(range(len(row)), key=lambda i: -row[i]):
            if mass < top_p:
                out[b, i] = probs[b, i]
            mass += row[i]
    return out


def repetition_penalty(logits: torch.Tensor, sequences: list[list[int]], penalty: float) -> torch.Tensor:
    """logits (B, V) -> (B, V) in logits' dtype, row b penalised for the ids in ``sequences[b]``
    (the row's ids so far, repeats allowed; ids outside [0, V) cannot be sampled and are
    skipped). Computed in fp64, rounded once to logits' dtype."""
    out = logits.clone()
    for b, ids in enumerate(sequences):
        for i in sorted(set(i for i in ids if 0 <= i < logits.shape[1])):
            x = float(logits[b, i].double())
            out[b, i] = x / penalty if x > 0 else x * penalty
    return out


def sample(logits: torch.Tensor, *, greedy: bool, temperature: float = 1.0, top_p: float | None = None,
           noise: torch.Tensor | None = None, penalty: float | None = None,
           sequences: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B,) int64, their log-probs (B,) fp32) from logits (B, V); ``noise`` (B, V) are the
    Exp(1) draws of the race (unused when greedy). penalty / sequences: the repetition
    penalty for each row's ids so far, applied first."""
    if penalty is not None:
        logits = repetition_penalty(logits, sequences, penalty)
    tokens, logps = [], []
    for b in range(logits.shape[0]):
        row = [float(x) for x in logits[b].double()]
        if greedy:
            tok = _argmax(row)
            logp = _log_softmax(row)
        else:
            logp = _log_softmax([x / temperature for x in row])
            p = torch.tensor([math.exp(lp) for lp in logp], dtype=torch.float64)
            if top_p is not None:
                p = top_p_filter(p[None], top_p)[0]
            e = [float(x) for x in noise[b].double()]
            tok = _argmax([float(pi) / ei for pi, ei in zip(p, e)])
        tokens.append(tok)
        logps.append(logp[tok])
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(logps, dtype=torch.float32)
