"""Latent-step decode engine: static KV cache, model adapters, CUDA graphs."""
from medlvr.engine.adapters import adapter_for, supported_model_types
from medlvr.engine.engine import GenerateOutput, LatentEngine, LatentSegment, TextOutput

__all__ = ["LatentEngine", "GenerateOutput", "LatentSegment", "TextOutput", "adapter_for", "supported_model_types"]
