"""Latent-step decode engine: static KV cache, model adapters, CUDA graphs."""
from medlvr.engine.adapters import adapter_for, supported_model_types
from medlvr.engine.engine import LatentEngine
from medlvr.engine.request import GenerateOutput, LatentSegment, TextOutput
from medlvr.engine.state import DecodeState

__all__ = ["LatentEngine", "DecodeState", "GenerateOutput", "LatentSegment", "TextOutput", "adapter_for",
           "supported_model_types"]
