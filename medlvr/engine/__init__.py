"""Latent-step decode engine: static KV cache, model adapters, CUDA graphs."""
from medlvr.engine.adapters import adapter_for, supported_model_types, supports
from medlvr.engine.engine import LatentEngine
from medlvr.engine.holder import EngineHolder, holder_for
from medlvr.engine.request import GenerateOutput, LatentSegment, TextOutput
from medlvr.engine.state import DecodeState

__all__ = ["LatentEngine", "EngineHolder", "holder_for", "DecodeState", "GenerateOutput", "LatentSegment",
           "TextOutput", "adapter_for", "supported_model_types", "supports"]
