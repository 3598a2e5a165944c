"""GRPO's group-normalised advantage, stated group by group: the executable spec of
``medlvr.ops.vlpo_loss.group_advantages``, checked by tests/ops/test_vlpo_loss_spec.py.

GRPO (Shao et al. 2024, DeepSeekMath, outcome supervision) scores each of the n rollouts of
one prompt against its group:

    A_i = (r_i - mean(r)) / (std(r) + eps),   std the population std (divide by n: docs/vlpo.md)

A group whose rewards are all equal (n == 1 included) says nothing about which rollout was
better: its advantages are exactly 0, not (0 / eps) noise.

The rest of the VLPO objective (the clipped surrogate, the KL terms, their token mean) has its
spec in closed form in medlvr/reference/fused_logprobs.py (``fused_vlpo_loss_ref``).
"""
from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, n: int, *, eps: float = 1e-6) -> torch.Tensor:
    """rewards (G * n,), groups of n consecutive rollouts -> advantages (G * n,), computed with
    Python floats (fp64) and returned in fp32, or fp64 for fp64 rewards."""
    r = [float(x) for x in rewards.double()]
    out = []
    for start in range(0, len(r), n):
        group = r[start:start + n]
        if max(group) == min(group):
            out += [0.0] * n
            continue
        mean = sum(group) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / n)
        out += [(x - mean) / (std + eps) for x in group]
    return torch.tensor(out, dtype=torch.promote_types(rewards.dtype, torch.float32))
