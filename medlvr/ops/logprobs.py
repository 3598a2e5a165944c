"""Batched log-prob gathering for VLPO: token log-probs and latent Gaussian log-probs.

    gather_logprobs(logits (N V), targets (N)) -> logp (N) fp32 [, entropy (N) fp32]
    latent_gaussian_logprob(mu (M D), z (M D), sigma) -> logp (M) fp32 (mu, z may differ in dtype)

N is the packed (ragged) token count of a batch. Fast paths: medlvr._C (C++ on CPU,
CUDA on GPU, see csrc/logprobs_*.{cpp,cu}); the plain-PyTorch spec is
medlvr/reference/logprobs.py, which also runs where the extension was not built.

Dtypes: inputs are read in their own dtype (bf16 logits from an autocast lm_head are
never copied to fp32); every log-prob, entropy and statistic is computed and returned in
fp32, so the loss built from them is fp32. fp64 inputs are computed in fp64 on every
backend and device (fp64 rule, medlvr/ops/_checks.py).
"""
from __future__ import annotations

import torch

from medlvr import _backend
from medlvr.ops import _checks
from medlvr.reference.logprobs import gather_logprobs_ref, latent_gaussian_logprob_ref

__all__ = ["gather_logprobs", "latent_gaussian_logprob"]


class _GatherLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_t: float, ignore_index: int, with_entropy: bool, inplace: bool):
        logp, lse, entropy = torch.ops.medlvr.logprobs_fwd(logits, targets, inv_t, ignore_index, with_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.inv_t, ctx.ignore_index, ctx.with_entropy, ctx.inplace = inv_t, ignore_index, with_entropy, inplace
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse, dtype=torch.float32)
        if not ctx.with_entropy:
            grad_entropy = None
        args = (grad_logp, grad_entropy, logits, targets, lse, entropy if ctx.with_entropy else None,
                ctx.inv_t, ctx.ignore_index)
        if ctx.inplace:
            # d logits overwrites the logits buffer: no second [N, V] tensor ever exists.
            torch.ops.medlvr.logprobs_bwd_(*args)
            grad = logits
        else:
            grad = torch.ops.medlvr.logprobs_bwd(*args)
        return grad, None, None, None, None, None


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False, inplace_backward: bool = False):
    """log_softmax(logits / temperature)[targets] per row, in fp32, in one pass over V.

    Args:
        logits: (N, V) fp16/bf16/fp32/fp64, rows contiguous. N may be 0 (an empty batch).
        targets: (N,) int32/int64 in [0, V), or ``ignore_index`` for rows that contribute
            nothing (their log-prob and entropy are 0 and their gradient is 0).
        temperature: > 0; the distribution is softmax(logits / temperature).
        return_entropy: also return the entropy of each row's tempered distribution
            (differentiable).
        inplace_backward: the backward writes d logits into the logits buffer instead of a
            new tensor, saving N*V elements at the peak. The logits are then overwritten:
            use it only when nothing else reads them after the backward (the usual case
            for logits = lm_head(hidden)).
    Returns:
        logp (N,) fp32, and entropy (N,) fp32 when ``return_entropy`` (fp64 for fp64 logits).
    Dtypes: one float tensor, nothing mixed. Logits are read in their dtype, the
    online logsumexp, 1/temperature, log-probs and entropy are fp32 (fp64 for fp64
    logits), and d logits is rounded once to the logits' dtype. A loss built from logp is
    fp32.
    """
    _checks.tensor("logits", logits, dims=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("targets", targets, dims=1, dtypes=_checks.INDEX_DTYPES)
    _checks.same_device("targets", targets, "logits", logits)
    temperature = _checks.positive_float("temperature", temperature)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    N, V = logits.shape
    if targets.shape[0] != N:
        raise ValueError(f"targets must have N = {N} entries (one per logits row), got {targets.shape[0]}")
    if V == 0:
        raise ValueError("logits must have at least one column (V > 0), got V = 0")
    if inplace_backward and logits.stride(1) != 1:
        raise ValueError(f"inplace_backward needs logits with contiguous rows (stride(1) == 1), "
                         f"got strides {tuple(logits.stride())}")
    _checks.targets_in_range("targets", targets, V, ignore_index)
    backend = _checks.backend("gather_logprobs", logits.device, has_ext=True, logits=logits)
    if backend == "reference":
        return gather_logprobs_ref(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=return_entropy)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    logp, entropy = _GatherLogprobs.apply(logits, targets, 1.0 / temperature, ignore_index, return_entropy,
                                          inplace_backward)
    return (logp, entropy) if return_entropy else logp


class _LatentGaussian(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, z, c: float):
        ctx.save_for_backward(mu, z)
        ctx.c = c
        return torch.ops.medlvr.gaussian_logprob_fwd(mu, z, c)

    @staticmethod
    def backward(ctx, grad):
        mu, z = ctx.saved_tensors
        need_mu, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dmu, dz = torch.ops.medlvr.gaussian_logprob_bwd(grad, mu, z, ctx.c, need_mu, need_z)
        return (dmu if need_mu else None), (dz if need_z else None), None


def latent_gaussian_logprob(mu: torch.Tensor, z: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """Gaussian log-prob of latent steps: -||z - mu||^2 / (2 sigma^2) per row, fp32.

    Args:
        mu: (M, D) the current policy's hidden states that produce each latent input (for the
            latent at segment step t this is the state at sequence position t - 1).
        z: (M, D) the latents the rollout actually fed back; same device as mu.
        sigma: > 0, the exploration standard deviation of the latent policy.
    The constant -D/2 log(2 pi sigma^2) is left out: it cancels in every ratio and KL.
    Gradients flow to mu, and to z when z requires grad.
    Dtypes: mu and z may be any two of fp16/bf16/fp32/fp64 (under bf16 autocast mu comes
    out of the model bf16 while the rollout's z is fp32). Two different dtypes are both
    cast up to their promoted dtype (fp32 for any pair of fp16/bf16/fp32, fp64 with an fp64
    one) before the subtraction: the cast is exact, so z - mu, which is of the order of
    sigma, is never rounded to the narrower dtype. The squared distance is accumulated and
    returned in fp32 (fp64 when either input is fp64), so the loss is fp32; each gradient
    comes back in its own input's dtype. Autocast changes none of this.
    """
    _checks.tensor("mu", mu, dims=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("z", z, dims=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_device("z", z, "mu", mu)
    if z.shape != mu.shape:
        raise ValueError(f"z must have the shape of mu {tuple(mu.shape)}, got {tuple(z.shape)}")
    sigma = _checks.positive_float("sigma", sigma)
    if z.dtype != mu.dtype:
        # the kernels take one dtype: cast the narrower input up (exact; autograd returns
        # its gradient in its own dtype). One (M, D) copy; M·D is small next to the logits.
        common = torch.promote_types(mu.dtype, z.dtype)
        mu, z = mu.to(common), z.to(common)
    backend = _checks.backend("latent_gaussian_logprob", mu.device, has_ext=True, mu=mu, z=z)
    if backend == "reference":
        return latent_gaussian_logprob_ref(mu, z, sigma=sigma)
    return _LatentGaussian.apply(mu, z, 1.0 / (2.0 * sigma * sigma))


def _register_fakes() -> None:
    """Meta kernels, so torch.compile can trace through the compiled ops."""
    if _backend.extension() is None:
        return
    lib = "medlvr::"

    @torch.library.register_fake(lib + "logprobs_fwd")
    def _(logits, targets, inv_temperature, ignore_index, with_entropy):
        n = logits.shape[0]
        stat = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return (logits.new_empty((n,), dtype=stat), logits.new_empty((n,), dtype=stat),
                logits.new_empty((n if with_entropy else 0,), dtype=stat))

    @torch.library.register_fake(lib + "logprobs_bwd")
    def _(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "logprobs_bwd_")
    def _(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index):
        return None

    @torch.library.register_fake(lib + "gaussian_logprob_fwd")
    def _(mu, z, inv_two_sigma_sq):
        return mu.new_empty((mu.shape[0],), dtype=torch.float64 if mu.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake(lib + "gaussian_logprob_bwd")
    def _(grad, mu, z, inv_two_sigma_sq, need_mu, need_z):
        return (torch.empty_like(mu) if need_mu else mu.new_empty((0,)),
                torch.empty_like(z) if need_z else z.new_empty((0,)))


_register_fakes()
