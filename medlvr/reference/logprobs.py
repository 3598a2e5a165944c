"""Reference log-prob gathering for VLPO: the executable spec of ``medlvr.ops.logprobs``.

Shapes: logits (N V), targets (N), mu/z (M D). N is the packed (ragged) token count of a
batch; nothing here is fast or memory-frugal on purpose (it materialises fp32 [N, V]).
"""
from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation, fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                        ignore_index: int = -100, return_entropy: bool = False):
    """logp[i] = log_softmax(logits[i] / T)[targets[i]] in fp32 (fp64 for fp64 logits); 0 (and no gradient) for
    rows whose target is ``ignore_index``. entropy[i] = -sum_j p_ij log p_ij of the same
    tempered distribution (0 for ignored rows)."""
    logp_all = torch.log_softmax(logits.to(_acc(logits.dtype)) / temperature, dim=-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe.long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # masked (-inf) logits have p = 0 and contribute 0, not 0 * -inf = NaN
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    return logp, entropy


def latent_gaussian_logprob_ref(mu: torch.Tensor, z: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """log N(z; mu, sigma^2 I) up to the constant -D/2 log(2 pi sigma^2), summed over D:
    -||z - mu||^2 / (2 sigma^2), in fp32. The constant cancels in every PPO ratio and KL,
    so it is left out (docs/vlpo.md)."""
    diff = z.to(_acc(z.dtype)) - mu.to(_acc(mu.dtype))
    return -(diff * diff).sum(-1) / (2.0 * sigma * sigma)
