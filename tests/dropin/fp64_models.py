"""fp64 tiny models for the preset tests (tests/engine/engine_models.py's configs).

HF takes two statistics in fp32 whatever the input dtype: the RMSNorm variance
(Qwen2_5_VLRMSNorm.forward casts to float32) and the rotary angles
(Qwen2_5_VLRotaryEmbedding.forward: positions and inv_freq as float), while medlvr's fp64
path keeps fp64 (medlvr/reference/decode.py, _compute_dtype). To compare the two at fp64
precision the test gives HF's modules the same formulas in the input's dtype:
w * x * rsqrt(mean(x^2) + eps), and cos/sin of positions * inv_freq (inv_freq's fp32
values, as medlvr's adapter takes them)."""
from __future__ import annotations

import types

import torch

import engine_models as tm


def _rmsnorm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_in_input_dtype(self, x, position_ids):
    position_ids = position_ids.expand(3, -1, -1)
    freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(torch.float32).to(x.dtype)
    cos = self.recomposition_frequencies(freqs.cos() * self.attention_scaling)
    sin = self.recomposition_frequencies(freqs.sin() * self.attention_scaling)
    return cos, sin


def fp64_norms(model):
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rmsnorm_in_input_dtype, m)
        if type(m).__name__ == "Qwen2_5_VLRotaryEmbedding":  # the text model's mRoPE, not the vision tower's
            m.forward = types.MethodType(_rotary_in_input_dtype, m)
    return model


def qwen2_5_vl():
    return fp64_norms(tm.qwen2_5_vl(dtype=torch.float64))


def gpt2():
    return tm.gpt2(dtype=torch.float64)


def vl_batch(samples, dtype=torch.float64) -> dict:
    batch = tm.left_pad([tm.vl_sample(hw, n, seed=s) for hw, n, s in samples])
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch
