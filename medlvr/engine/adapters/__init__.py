"""Model adapters, chosen by ``config.model_type`` (see base.py for how to add one)."""
from medlvr.engine.adapters import gpt2, llama, qwen2, qwen2_5_vl, qwen2_vl  # noqa: F401  (registers)
from medlvr.engine.adapters.base import (DecoderLayer, ModelAdapter, Prefill, adapter_for,
                                         supported_model_types, supports)

__all__ = ["DecoderLayer", "ModelAdapter", "Prefill", "adapter_for", "supported_model_types", "supports"]
