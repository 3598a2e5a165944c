"""Public differentiable ops of medlvr (argument checks, autograd, dispatch)."""
from medlvr.ops.logprobs import gather_logprobs, latent_gaussian_logprob

__all__ = ["gather_logprobs", "latent_gaussian_logprob"]
