"""Models for medlvr: the embedded small Qwen2.5-VL, local checkpoint loading, latent tokens, mRoPE positions.

    model, processor = medlvr.models.build_default(seed=0)
    model, processor = medlvr.models.load("/path/to/Qwen2.5-VL-7B-Instruct", dtype=torch.bfloat16)
    ids = medlvr.models.latent_token_ids(processor)          # LatentTokens(start, end, pad)
    pos, deltas = medlvr.models.rope_positions(model, input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
"""
from medlvr.models._tokens import (LATENT_END, LATENT_PAD, LATENT_START, LatentTokens, add_latent_tokens,
                                   latent_token_ids)
from medlvr.models.default import build_default, build_processor, default_config
from medlvr.models.loader import load
from medlvr.models.hf import rope_positions

__all__ = [
    "build_default", "build_processor", "default_config", "load", "latent_token_ids", "LatentTokens",
    "add_latent_tokens", "rope_positions", "LATENT_START", "LATENT_END", "LATENT_PAD",
]
