"""Llama decoders (LlamaForCausalLM): optional attention / MLP biases, plain RoPE
(llama3 frequency scaling is baked into inv_freq, so it needs nothing here)."""
from __future__ import annotations

from medlvr.engine.adapters.base import TextDecoderAdapter, register


@register
class LlamaAdapter(TextDecoderAdapter):
    model_types = ("llama",)
