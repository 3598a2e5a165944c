"""Token sampling on device, with no host sync and no data-dependent shapes, so a
decode step that samples can be captured in a CUDA graph: the sampler of the engine
(medlvr/engine/step.py) and of the plain-HF loop (medlvr/engine/hf_loop.py). Its row-by-row
spec is medlvr/reference/sampling.py (checked by tests/engine/test_sampling.py).

Random draws come in as a ``noise`` tensor of Exp(1) variates, filled outside the graph
from the caller's generator before each step: argmax_i p_i / E_i is an exact sample
from p (the "exponential race": E_i / p_i ~ Exp(rate p_i), and the smallest of
independent exponentials is i with probability p_i / sum p). It needs no normalisation,
so top-p can simply zero the tail.

The repetition penalty (``repetition_penalty``) is HF's RepetitionPenaltyLogitsProcessor
over a (B, V) mask of the ids already in each row's sequence (the engine keeps it on the
device, medlvr/engine/state.py); it comes before temperature and top-p, as in HF generate.
"""
from __future__ import annotations

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches top_p
    (nucleus sampling). probs (B V); top_p a 0-d/1-element tensor in (0, 1].

    A token is kept when the mass strictly before it (in descending order) is < top_p,
    so the most likely token always survives.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float,
                       inverse: torch.Tensor | None = None) -> torch.Tensor:
    """HF's repetition penalty (CTRL, Keskar et al. 2019): the logit of every token already in
    the row's sequence (``seen`` (B, V) bool) is divided by ``penalty`` when it is positive and
    multiplied by it when it is negative (so penalty > 1 makes a seen token less likely either
    way), once per token however often it occurred; other logits are unchanged. logits (B, V);
    penalty a float or a 0-d tensor (the engine's device buffer). A new tensor.

    inverse: 1 / penalty in logits' dtype; given, positive logits are multiplied by it instead.
    That is how torch divides a CUDA tensor by a Python float (a * reciprocal(b)), i.e. what
    HF's processor computes on CUDA; on CPU it divides. The engine passes it on CUDA only."""
    down = logits * inverse if inverse is not None else logits / penalty
    return torch.where(seen, torch.where(logits < 0, logits * penalty, down), logits)


def sample(logits: torch.Tensor, *, greedy: bool, temperature: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None, noise: torch.Tensor | None = None,
           penalty: torch.Tensor | None = None, seen: torch.Tensor | None = None,
           penalty_inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B) int64 and their log-probs (B) fp32 from logits (B V).

    penalty / seen (/ penalty_inverse): when given, ``repetition_penalty(...)`` first, and
    "logits" below are the penalised ones (HF applies the penalty before its warpers).
    greedy: argmax; log-prob under log_softmax(logits).
    otherwise: log-prob under log_softmax(logits / temperature) (before top-p, the
    distribution the policy defines), token drawn from that distribution restricted to
    the top-p nucleus using ``noise`` (B V) of Exp(1) draws.
    """
    logits = logits.float()
    if penalty is not None:
        logits = repetition_penalty(logits, seen, penalty, penalty_inverse)
    if greedy:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        probs = logp.exp()
        if top_p is not None:
            probs = top_p_filter(probs, top_p)
        tok = (probs / noise).argmax(dim=-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
