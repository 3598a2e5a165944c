"""Public ops of medlvr: argument checks, one autograd wrapper each, dispatch to the
compiled extension / Triton / the reference in medlvr.reference (the "reference" backend,
medlvr/_backend.py)."""
from medlvr.ops.decode import decode_attention, rmsnorm_feedback, rotary_append
from medlvr.ops.fused_logprobs import (fused_linear_cross_entropy, fused_linear_logprobs, fused_vlpo_loss,
                                      fusable_lm_head, lm_head_logprobs)
from medlvr.ops.logprobs import gather_logprobs, latent_gaussian_logprob
from medlvr.ops.roi_align_loss import RoiGeometry, prepare_roi_geometry, roi_align_loss, roi_pool_targets

__all__ = [
    "RoiGeometry",
    "decode_attention",
    "fusable_lm_head",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "fused_vlpo_loss",
    "gather_logprobs",
    "latent_gaussian_logprob",
    "lm_head_logprobs",
    "prepare_roi_geometry",
    "rmsnorm_feedback",
    "roi_align_loss",
    "roi_pool_targets",
    "rotary_append",
]
