"""mRoPE positions: the one place in medlvr that calls HF's `get_rope_index` (DESIGN §7)."""
from __future__ import annotations

import inspect

import torch


def _rope_owner(model):
    # Qwen2(.5)-VL ForConditionalGeneration keeps get_rope_index on the inner `.model`;
    # accept the inner model too.
    for cand in (getattr(model, "model", None), model):
        if cand is not None and hasattr(cand, "get_rope_index"):
            return cand
    raise TypeError(f"model: expected a Qwen2-VL / Qwen2.5-VL model with get_rope_index, got {type(model).__name__}")


def rope_positions(model, input_ids, attention_mask, image_grid_thw, mm_token_type_ids):
    """3-section mRoPE positions of a (possibly padded) multimodal batch.

    Args:
        input_ids: (B, S) long.
        attention_mask: (B, S) 0/1 or None; padding (left or right) gets position 0.
        image_grid_thw: (I, 3) long, images in packing order, or None for text only.
        mm_token_type_ids: (B, S) int, 1 at image tokens, 0 elsewhere. Required: without it HF
            silently falls back to 1-D positions (DESIGN §7).

    Returns:
        position_ids: (3, B, S) long.
        rope_deltas: (B, 1) long, HF's convention: a token that follows the prompt and has n
            real (non-pad) tokens before it gets position n + rope_delta in all three sections.
            For right padding or no padding n is its sequence index; for a left-padded row it is
            the sequence index minus the row's pad count. Each latent step advances n by one.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, S), got {tuple(input_ids.shape)}")
    if mm_token_type_ids is None:
        raise ValueError("mm_token_type_ids: expected a (B, S) tensor (1 at image tokens), got None")
    if mm_token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"mm_token_type_ids: expected shape {tuple(input_ids.shape)}, got {tuple(mm_token_type_ids.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    owner = _rope_owner(model)
    if image_grid_thw is None:
        # Text only: plain 1-D positions over real tokens, same in all three sections.
        if attention_mask is None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0) * attention_mask.long()
        position_ids = pos.unsqueeze(0).expand(3, -1, -1).clone()
        # Positions count real tokens exactly, so the offset to the next one is zero.
        return position_ids, torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)

    kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    params = inspect.signature(owner.get_rope_index).parameters
    # transformers < 5.2x derives the image spans from input_ids itself and has no
    # mm_token_type_ids argument; newer versions require it.
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = mm_token_type_ids
    position_ids, deltas = owner.get_rope_index(input_ids, **kwargs)
    return position_ids, deltas.view(-1, 1).to(torch.long)
