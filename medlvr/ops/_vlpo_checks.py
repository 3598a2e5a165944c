"""The argument checks of medlvr.ops.fused_vlpo_loss (medlvr/ops/fused_logprobs.py), all run
before its first GEMM: shapes, dtypes and devices, the objective's scalars (finite, in range:
medlvr.ops.vlpo_loss.check_terms, which vlpo_loss runs too), and the values a caller hands in
(advantages, old and reference log-probs, the reference's latent means: finite where they
enter the loss; no scored -100 token), those read back from the device in one transfer.

A NaN or inf among those values does not raise anywhere downstream: it turns the loss, and
every gradient, into NaN (an inf advantage times a zero log-ratio, an inf old log-prob in
exp), which an optimizer step then writes into the weights.
"""
from __future__ import annotations

import torch

from medlvr.ops import _checks
from medlvr.ops.vlpo_loss import check_terms, latent_scale as sigma_over_sqrt_d


def check_like(name: str, t, shape: tuple, ref_name: str, ref: torch.Tensor) -> None:
    _checks.tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_device(name, t, ref_name, ref)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_vlpo(hidden, tokens, token_mask, token_old, advantages, latent_old, mu, z, token_ref, mu_ref, *,
               latent_sigma, temperature, eps_low, eps_high, dual_clip, latent_coef, kl_beta,
               latent_scale) -> tuple[int, float, float, float]:
    """fused_vlpo_loss's arguments, checked; returns (K, latent_sigma, temperature,
    latent_scale), latent_scale None resolved to sigma / sqrt(D) (D = mu's width; 1 without
    mu, where there is no Gaussian log-prob to scale)."""
    for name, t, dims in (("hidden", hidden, 3), ("advantages", advantages, 1)):
        _checks.tensor(name, t, dims=dims, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("tokens", tokens, dims=2, dtypes=_checks.INDEX_DTYPES)
    R, T, D = hidden.shape
    if latent_old is not None:
        _checks.tensor("latent_old", latent_old, dims=2, dtypes=_checks.FLOAT_DTYPES)
        K = latent_old.shape[1]
    else:
        K = 0 if mu is None else _checks.tensor("mu", mu, dims=3, dtypes=_checks.FLOAT_DTYPES).shape[1]
    if token_old is not None:
        check_like("token_old", token_old, (R, T), "hidden", hidden)
    check_like("advantages", advantages, (R,), "hidden", hidden)
    if latent_old is not None:
        check_like("latent_old", latent_old, (R, K), "hidden", hidden)
    _checks.tensor("token_mask", token_mask, dims=2)
    if tuple(tokens.shape) != (R, T) or tuple(token_mask.shape) != (R, T):
        raise ValueError(f"tokens and token_mask must have shape {(R, T)} (hidden's first two dims), got "
                         f"{tuple(tokens.shape)} and {tuple(token_mask.shape)}")
    _checks.same_device("token_mask", token_mask, "hidden", hidden)
    if (mu is None) != (z is None):
        raise ValueError("mu and z must be given together (both (R, K, D)) or both be None")
    if mu is not None:
        check_like("mu", mu, (R, K, D), "hidden", hidden)
        check_like("z", z, (R, K, D), "hidden", hidden)
    if mu is not None:
        latent_sigma = _checks.positive_float("latent_sigma", latent_sigma)
    temperature = _checks.positive_float("temperature", temperature)
    if latent_scale is None:  # the documented objective (docs/vlpo.md), what VLPOConfig's latent_norm gives
        latent_scale = sigma_over_sqrt_d(latent_sigma, D) if mu is not None else 1.0
    check_terms(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, latent_coef=latent_coef, kl_beta=kl_beta,
                latent_scale=latent_scale)
    latent_on = latent_coef > 0 and R * K > 0  # as the op decides it (medlvr/ops/fused_logprobs.py)
    uses_mu_ref = kl_beta > 0 and mu is not None and K > 0 and latent_coef > 0
    if kl_beta > 0:
        if token_ref is None:
            raise ValueError("token_ref: expected reference log-probs when kl_beta > 0, got None")
        check_like("token_ref", token_ref, (R, T), "hidden", hidden)
        if uses_mu_ref:
            if mu_ref is None:
                raise ValueError("mu_ref: expected the reference's latent means (R, K, D) when kl_beta > 0 and "
                                 "the latent term is on, got None")
            check_like("mu_ref", mu_ref, (R, K, D), "hidden", hidden)

    keep = token_mask.bool()
    # Only the values that enter the loss: old / reference log-probs at the scored positions
    # (a caller may fill the others with anything), the latent ones when the latent term is on.
    finite = [("advantages", advantages, None), ("token_old", token_old, keep),
              ("token_ref", token_ref if kl_beta > 0 else None, keep),
              ("latent_old", latent_old if latent_on else None, None),
              ("mu_ref", mu_ref if uses_mu_ref else None, None)]
    finite = [(n, t, w) for n, t, w in finite if t is not None]
    # A scored position holding the ignore index would get log-prob 0 and no gradient, yet
    # count in the divisor and add a PPO term: a caller's masking bug, not a value to skip.
    scored_ignored = keep & (tokens == -100)
    flags = _checks.read_flags(scored_ignored.any(), *((torch.isfinite(t) | ~w if w is not None
                                                        else torch.isfinite(t)).all() for _, t, w in finite))
    if flags[0]:
        r, t = (int(i) for i in scored_ignored.nonzero()[0])
        raise ValueError(f"tokens[{r}, {t}] = -100 (the ignore index) at a scored position (token_mask True): "
                         "expected a token id there, or token_mask False")
    for (name, t, where), ok in zip(finite, flags[1:]):
        if not ok:
            raise _checks.nonfinite_error(name, t, where, "" if where is None else
                                          " at the scored positions (token_mask True)")
    return K, latent_sigma, temperature, float(latent_scale)
