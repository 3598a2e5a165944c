"""The lm_head choice, made once for both stages: the fused op on the head's weight, or the
head's own forward.

A head that is exactly ``h @ W^T + b`` (a plain nn.Linear, also one that FSDP's
``fully_shard`` made into an FSDPLinear) is computed from its weight by the fused ops of
medlvr/ops/fused_logprobs.py, which never build the (tokens, V) logits. Any other head (peft's
LoRA or a quantised wrapper on it, a replaced forward such as accelerate's offload hook) is only
defined by its forward, so the caller's unfused path runs it. Stage 1's answer cross-entropy
(medlvr/policy/latent.py) and VLPO's objective (medlvr/train/vlpo/step.py) both go through
:func:`through_head` (liger-kernel makes the same choice once, inside the model's forward:
``lce_forward`` in src/liger_kernel/transformers/model/qwen2_5_vl.py).
"""
from __future__ import annotations

import types
from typing import Any, Callable

from torch import nn

from medlvr.policy.fsdp import is_sharded

__all__ = ["fusable_head", "with_head_weight", "through_head"]

_HEAD_METHOD = "_medlvr_with_weight"


def fusable_head(head: nn.Module) -> bool:
    """True when ``head(h)`` is exactly ``h @ head.weight.T + head.bias``: a plain nn.Linear, or
    one that fully_shard made into ``FSDPLinear`` (a subclass that adds hooks only)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(head)
    plain = cls is nn.Linear or (issubclass(cls, FSDPModule) and cls.__bases__ == (FSDPModule, nn.Linear))
    return plain and "forward" not in vars(head)


def _call_with_weight(self: nn.Module, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    return fn(self.weight, self.bias, *args, **kwargs)


def with_head_weight(head: nn.Module, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(weight, bias, *args, **kwargs)`` with the lm_head's full weight and bias.

    The fused ops read ``head.weight`` without calling the head's forward, so on a sharded
    head FSDP's hooks would not run and they would see the DTensor shard. A sharded head
    therefore runs ``fn`` as one of its FSDP forward methods: FSDP all-gathers the weight before
    (its own unsharded parameter, in the all-gather dtype), frees it after, and in backward
    gathers it again and reduce-scatters its gradient; tensors in args that need a gradient
    anchor that reduce-scatter, as a forward's inputs do. An unsharded head: a call."""
    if not is_sharded(head):
        return fn(head.weight, head.bias, *args, **kwargs)
    if _HEAD_METHOD not in vars(head):
        from torch.distributed.fsdp import register_fsdp_forward_method

        setattr(head, _HEAD_METHOD, types.MethodType(_call_with_weight, head))
        register_fsdp_forward_method(head, _HEAD_METHOD)
    return getattr(head, _HEAD_METHOD)(fn, *args, **kwargs)


def through_head(head: nn.Module, hidden: Any, *, fused: Callable, unfused: Callable) -> Any:
    """``fused(weight, bias, hidden)`` for a head the fused ops can compute from its weight
    (:func:`fusable_head`), else ``unfused(head, hidden)``: the one place the choice is made."""
    if fusable_head(head):
        return with_head_weight(head, fused, hidden)
    return unfused(head, hidden)
