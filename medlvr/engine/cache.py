"""The engine's static KV cache: one (max_batch, Hkv, max_len, Dh) K and V buffer per
layer, allocated once, with per-sample lengths kept by the engine.

Prompts arrive left-padded; their K/V are stored compacted, sample b's valid tokens at
cache positions [0, n_b). Positions are carried separately (mRoPE positions are not
sequence indices), so compaction changes nothing in the attention result.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, *, num_layers: int, max_batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (max_batch, num_kv_heads, max_len, head_dim)
        self.shape = shape
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def max_batch(self) -> int:
        return self.shape[0]

    @property
    def max_len(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def load_prompt(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor) -> None:
        """Copy left-padded prompt K/V (per layer (B, Hkv, S, Dh)) into rows [0, B),
        sample b's last lengths[b] positions moved to [0, lengths[b]).

        One gather per layer (index j of row b reads source position S - n_b + j), and
        positions j >= n_b keep what the cache held: nothing is written beyond a
        sample's own length.
        """
        B, _, S, _ = keys[0].shape
        if S > self.max_len:
            raise ValueError(f"prompt length S={S} exceeds the cache's max_len={self.max_len}")
        dev = self.k[0].device
        lengths = lengths.to(dev)
        j = torch.arange(S, device=dev)
        src = (S - lengths[:, None] + j[None, :]).clamp(max=S - 1)  # (B, S)
        valid = (j[None, :] < lengths[:, None])[:, None, :, None]  # (B, 1, S, 1)
        for layer, (k, v) in enumerate(zip(keys, values)):
            idx = src[:, None, :, None].expand(B, k.shape[1], S, k.shape[3])
            for cache, new in ((self.k[layer], k), (self.v[layer], v)):
                dst = cache[:B, :, :S]
                dst.copy_(torch.where(valid, new.to(dev, cache.dtype).gather(2, idx), dst))
