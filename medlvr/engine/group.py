"""Grouped generation: G rows per prompt that share the prompt's K/V (GRPO / VLPO rollouts).

A group's rows differ only after the prompt (their latent noise and sampled tokens), so
the prompt is prefilled once and its K/V kept once, in a shared prefix cache
(max_prompts, Hkv, max_prompt_len, Dh); each row's own cache holds only its suffix
(latents, <|latent_end|>, answer). Attention of a row is cascade attention (as FlashInfer
does): attention over its prompt's prefix and over its own suffix, each with its
log-sum-exp, merged exactly (medlvr.ops.decode.merge_attention):

    softmax over [prefix; suffix] = w_p * softmax_prefix + w_s * softmax_suffix,
    w_p = e^lse_p / (e^lse_p + e^lse_s), w_s = 1 - w_p.

The prefix call reads each prompt's K/V once for all G rows of the group when it can: the
G rows' query heads are folded into one query block per kv head (the kernel computes a
[G * group, Dh] x [Dh, BLOCK_N] tile per K/V tile, so the prompt is streamed once per
group per step, not G times). With more than ``FOLD_MAX`` query heads per kv head the
block would not fit in registers; then every row reads its prompt through the row map of
decode_attention (the K/V are still stored once, the reads are not shared).

Prefill work and prompt K/V memory per group drop G-fold; with folding, so does the
prompt's share of the per-step attention reads. Rows of a group equal independent rows
given the same noise (tests/engine/test_group.py).
"""
from __future__ import annotations

import torch

from medlvr.ops.decode import decode_attention, merge_attention

# Largest folded query block (G * query heads per kv head) for the prefix call. 64 rows:
# Qwen2.5-VL-7B (group 7) with G = 8 is 56 rows in a 64-row block. tests/ops/test_decode_compile.py
# compiles it for sm_90 and sm_80 in each dtype without spills: bf16/fp16 in 168-178
# registers; fp32 only with its own tile of 32 keys over 8 warps (128-154 registers,
# medlvr/kernels/decode_attention.py): with bf16's tile it spilled kilobytes a thread.
FOLD_MAX = 64


def prefix_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, *, group: int,
                     prompts: int, prompt_lengths: torch.Tensor, row_prompt: torch.Tensor,
                     row_lengths: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every row (B = bucket >= prompts * group rows, Hq, Dh) over its prompt
    in the prefix cache; returns (out (B Hq Dh), lse (B Hq)). Rows past prompts * group
    (bucket padding) get 0 and lse -inf. Shapes depend on (B, prompts, group) only."""
    B, Hq, Dh = q.shape
    Hkv = k_prefix.shape[1]
    per_kv = Hq // Hkv
    R = prompts * group
    if group * per_kv > FOLD_MAX:
        return decode_attention(q, k_prefix, v_prefix, row_lengths, rows=row_prompt, scale=scale, return_lse=True)
    # (R, Hq, Dh) rows p * G + j -> (P, Hkv * G * per_kv, Dh): query head h' = hk * G * per_kv
    # + j * per_kv + i reads kv head h' // (G * per_kv) = hk, as decode_attention's GQA does.
    qf = q[:R].reshape(prompts, group, Hkv, per_kv, Dh).transpose(1, 2).reshape(prompts, Hkv * group * per_kv, Dh)
    o, lse = decode_attention(qf, k_prefix, v_prefix, prompt_lengths, scale=scale, return_lse=True)
    o = o.reshape(prompts, Hkv, group, per_kv, Dh).transpose(1, 2).reshape(R, Hq, Dh)
    lse = lse.reshape(prompts, Hkv, group, per_kv).transpose(1, 2).reshape(R, Hq)
    if B > R:  # bucket padding rows: an empty prefix
        o = torch.cat([o, o.new_zeros(B - R, Hq, Dh)])
        lse = torch.cat([lse, lse.new_full((B - R, Hq), float("-inf"))])
    return o, lse


def cascade_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                      k_prefix: torch.Tensor, v_prefix: torch.Tensor, group: int, prompts: int,
                      prompt_lengths: torch.Tensor, row_prompt: torch.Tensor, row_lengths: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """One decode step's attention for grouped rows: prefix (shared prompt) + suffix (the
    row's own cache, ``lengths`` positions, the step's key included) + merge."""
    o_p, lse_p = prefix_attention(q, k_prefix, v_prefix, group=group, prompts=prompts,
                                  prompt_lengths=prompt_lengths, row_prompt=row_prompt, row_lengths=row_lengths,
                                  scale=scale)
    o_s, lse_s = decode_attention(q, k_cache, v_cache, lengths, scale=scale, return_lse=True)
    return merge_attention(o_p, lse_p, o_s, lse_s)
