"""Reference of the fused lm_head log-prob op and the fused VLPO objective: the unfused path.

    fused_linear_logprobs_ref(hidden (N D), weight (V D), targets (N)) -> logp (N) [, entropy (N)]
    fused_linear_cross_entropy_ref(hidden (N D), weight (V D), targets (N)) -> loss ()
    fused_vlpo_loss_ref(hidden (R T D), weight (V D), tokens (R T), ...) -> (loss, token_logp (R T),
                                                                            latent_logp (R K))

All materialise the (N, V) logits ``hidden @ weight.T (+ bias)`` and hand them to
gather_logprobs_ref, which makes an fp32 copy: that is what the fast path in
medlvr/ops/fused_logprobs.py must equal without ever holding either tensor. The VLPO
objective here is literally medlvr.reference.vlpo_loss.vlpo_loss over those log-probs and the latent
Gaussian log-probs, i.e. what rollout.policy_forward + vlpo_loss compute.

The dtype contract of the op lives here too (:func:`compute_dtype`), because the reference is
the spec of which precision the lm_head GEMM runs in.
"""
from __future__ import annotations

import torch

from medlvr.reference.logprobs import gather_logprobs_ref, latent_gaussian_logprob_ref
from medlvr.reference.vlpo_loss import vlpo_loss  # the one definition of the clip / KL / aggregation

_LOW = (torch.float16, torch.bfloat16)


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the lm_head GEMM runs in (log-softmax math is fp32 whatever it is).

    - fp64 only with fp64 (gradcheck): anything else next to fp64 is an error.
    - Under ``torch.autocast`` on the tensors' device: the autocast dtype, as ``F.linear``
      would (typical: bf16 activations against fp32 master weights).
    - Otherwise equal dtypes run as they are, and fp32 next to bf16 / fp16 runs in the
      16-bit dtype (the weight, or the hidden states, is cast once); bf16 next to fp16 is
      refused, as there is no lossless common choice.
    """
    if torch.float64 in (hidden_dtype, weight_dtype):
        if hidden_dtype != weight_dtype:
            raise TypeError(f"weight must have the dtype of hidden when either is float64, got hidden "
                            f"{str(hidden_dtype)[6:]} and weight {str(weight_dtype)[6:]}")
        return torch.float64
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden_dtype == weight_dtype:
        return hidden_dtype
    if hidden_dtype in _LOW and weight_dtype in _LOW:
        raise TypeError(f"weight and hidden must not mix float16 and bfloat16, got hidden "
                        f"{str(hidden_dtype)[6:]} and weight {str(weight_dtype)[6:]}")
    return hidden_dtype if hidden_dtype in _LOW else weight_dtype


def fused_linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              ignore_index: int = -100, return_entropy: bool = False):
    """log_softmax((hidden @ weight.T + bias) / T)[targets] per row, through full logits.

    The logits are computed in :func:`compute_dtype` (so they carry the rounding the model's
    own lm_head would give them), then log-softmaxed in fp32 (fp64 for fp64).
    """
    c = compute_dtype(hidden.dtype, weight.dtype, hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(hidden.to(c), weight.to(c), None if bias is None else bias.to(c))
    return gather_logprobs_ref(logits, targets, temperature=temperature, ignore_index=ignore_index,
                               return_entropy=return_entropy)


def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   weights: torch.Tensor | None = None, reduction: str = "mean",
                                   bias: torch.Tensor | None = None, temperature: float = 1.0,
                                   ignore_index: int = -100, return_logprobs: bool = False):
    """sum_i w_i CE_i ("sum"), or that / sum_i w_i ("mean", 0 when every row is ignored), over
    the rows whose target is not ignore_index, through full logits (w_i = weights[i], default 1)."""
    logp = fused_linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                     ignore_index=ignore_index)
    w = (targets != ignore_index).to(logp.dtype)
    if weights is not None:
        w = w * weights.to(logp.dtype)
    loss = -(w * logp).sum()
    if reduction == "mean":
        total = w.sum()
        loss = loss / torch.where(total != 0, total, torch.ones_like(total))
    return (loss, logp.detach()) if return_logprobs else loss


def fused_vlpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                        token_old: torch.Tensor | None, advantages: torch.Tensor, *, latent_old: torch.Tensor | None,
                        mu: torch.Tensor | None = None, z: torch.Tensor | None = None, latent_sigma: float = 0.0,
                        eps_low: float, eps_high: float, dual_clip: float, latent_coef: float,
                        kl_beta: float = 0.0, token_ref: torch.Tensor | None = None,
                        latent_ref: torch.Tensor | None = None, temperature: float = 1.0,
                        bias: torch.Tensor | None = None):
    """The VLPO objective of one batch of rollouts, unfused: (loss, token_logp, latent_logp).

    Shapes as medlvr.reference.vlpo_loss.vlpo_loss takes them: hidden (R T D) are the states that
    predict the answer tokens (R T); mu / z (R K D) the latent means and fed-back latents
    (None: no latent term, latent log-probs 0, as policy_forward gives for sigma = 0).
    token_old / latent_old None: on-policy, the computed log-probs detached (K from mu then).
    """
    R, T = tokens.shape
    keep = token_mask.bool()
    logp = fused_linear_logprobs_ref(hidden[keep], weight, tokens[keep], bias=bias, temperature=temperature)
    token_logp = torch.zeros(R, T, dtype=logp.dtype, device=hidden.device).masked_scatter(keep, logp)
    K = latent_old.shape[1] if latent_old is not None else (0 if mu is None else mu.shape[1])
    if mu is not None and K > 0:
        D = mu.shape[-1]
        latent_logp = latent_gaussian_logprob_ref(mu.reshape(-1, D), z.reshape(-1, D), sigma=latent_sigma).view(R, K)
    else:
        latent_logp = torch.zeros(R, K, dtype=torch.float32, device=hidden.device)
    token_old = token_logp.detach() if token_old is None else token_old
    latent_old = latent_logp.detach() if latent_old is None else latent_old
    loss, _ = vlpo_loss(token_logp=token_logp, token_old=token_old, token_mask=token_mask, latent_logp=latent_logp,
                        latent_old=latent_old, advantages=advantages, eps_low=eps_low, eps_high=eps_high,
                        dual_clip=dual_clip, latent_coef=latent_coef, kl_beta=kl_beta, token_ref=token_ref,
                        latent_ref=latent_ref)
    return loss, token_logp, latent_logp
