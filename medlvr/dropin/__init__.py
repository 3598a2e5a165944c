"""Drop-in latent acceleration for existing latent-reasoning models (docs/dropin.md)."""
from medlvr.dropin.run import DropinOutput, custom_generate, decoding_settings, engine_prompts, generate, patch
from medlvr.dropin.spec import PRESETS, LatentSpec, ResolvedTokens, presets

__all__ = ["LatentSpec", "ResolvedTokens", "PRESETS", "presets", "generate", "patch", "custom_generate",
           "DropinOutput", "engine_prompts", "decoding_settings"]
