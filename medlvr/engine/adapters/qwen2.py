"""Qwen2 / Qwen2.5 text decoders (Qwen2ForCausalLM): q/k/v biases, plain RoPE."""
from __future__ import annotations

from medlvr.engine.adapters.base import TextDecoderAdapter, register


@register
class Qwen2Adapter(TextDecoderAdapter):
    model_types = ("qwen2",)
