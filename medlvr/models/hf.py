"""medlvr's one point of contact with transformers' model internals.

Everything else in medlvr (the engine adapters, the training layer, the reference latent
loop, the benchmarks and the tests) reaches a Hugging Face Qwen-VL / causal-LM model
through the functions here, so a change in transformers is made once, in this file:

- :func:`unwrap`: the ``*ForConditionalGeneration`` / ``*ForCausalLM`` inside peft, DDP,
  FSDP and torch.compile wrappers;
- :func:`decoder`: its decoder stack (``model.model.language_model`` for the VL models,
  ``model.model`` for text-only ones);
- :func:`vision_tower`: the vision encoder; :func:`vision_tokens` / :func:`embed_inputs`:
  merged vision tokens and prompt embeddings;
- :func:`rope_positions` / :func:`positions`: mRoPE positions, the only call of HF's
  ``get_rope_index`` in medlvr; :func:`prompt_inputs`: all three for a prompt batch;
- :func:`cache_keyword`, :func:`new_cache`, :func:`new_static_cache`, :func:`rewind_static_cache`,
  :func:`output_cache`, :func:`cache_layer_kv`: the KV-cache object and its keyword (transformers 5.2x renamed
  ``past_key_values`` to ``cache``);
- :func:`run_decoder`: one decoder-stack call returning the post-final-norm hidden states
  (:func:`decoder_kwargs`: its arguments, for callers that compile the decoder).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["unwrap", "decoder", "hidden_size", "is_multimodal", "vision_tower", "vision_tokens", "embed_inputs",
           "rope_positions", "mm_token_type_ids", "positions", "prompt_inputs", "cache_keyword", "new_cache",
           "new_static_cache", "rewind_static_cache", "output_cache", "cache_layer_kv", "decoder_kwargs",
           "run_decoder", "save_pretrained"]


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model (``*ForConditionalGeneration`` / ``*ForCausalLM``) inside peft / DDP /
    FSDP / torch.compile wrappers.

    peft replaces Linear layers in place, so the unwrapped module still runs the LoRA
    weights (and ``disable_adapter()`` on the wrapper still switches them off)."""
    m = model
    for _ in range(8):
        # peft first: a PeftModel forwards attribute lookups to the wrapped model, so it looks
        # like the HF model from outside but is not one (no get_rope_index on its .model).
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        elif hasattr(m, "lm_head") and (hasattr(m, "model") or hasattr(m, "transformer")):
            return m  # GPT2LMHeadModel keeps its decoder as .transformer
        elif isinstance(getattr(m, "module", None), nn.Module):  # DDP, FSDP
            m = m.module
        elif hasattr(m, "_orig_mod"):  # torch.compile
            m = m._orig_mod
        else:
            break
    raise TypeError(f"model: expected an HF *ForConditionalGeneration / *ForCausalLM (maybe wrapped), "
                    f"got {type(model).__name__}")


def is_multimodal(model: nn.Module) -> bool:
    """True for the Qwen-VL layout (vision tower + ``language_model``, 3-section mRoPE)."""
    return hasattr(_inner(unwrap(model)), "language_model")


def _inner(hf_model: nn.Module) -> nn.Module:
    inner = getattr(hf_model, "model", None)
    return inner if inner is not None else hf_model.transformer


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embed_tokens, layers, final norm, rotary_emb; GPT-2's
    ``transformer``: wte, wpe, h, ln_f)."""
    inner = _inner(unwrap(model))
    return inner.language_model if hasattr(inner, "language_model") else inner


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a VL model (Qwen-VL: ``model.visual``), None for a text-only one."""
    return getattr(_inner(unwrap(model)), "visual", None)


def hidden_size(model: nn.Module) -> int:
    """Width D of the decoder's hidden states (the latent size)."""
    return int(decoder(model).config.hidden_size)


def vision_tokens(model: nn.Module, pixel_values: torch.Tensor | None,
                  image_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
    """[T, D] merged (2x2) vision tokens of all images of the batch, in packing order
    (None without images)."""
    if pixel_values is None or image_grid_thw is None or image_grid_thw.numel() == 0:
        return None
    out = unwrap(model).model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    feats = out.pooler_output
    return torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats


def embed_inputs(model: nn.Module, input_ids: torch.Tensor, vis: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with the image placeholders replaced by the vision tokens."""
    base = unwrap(model)
    emb = base.get_input_embeddings()(input_ids)
    if vis is not None:
        mask = (input_ids == base.config.image_token_id).unsqueeze(-1)
        n = int(mask.sum())
        if n != vis.shape[0]:
            raise ValueError(f"input_ids: expected {vis.shape[0]} image tokens (one per merged vision token), got {n}")
        emb = emb.masked_scatter(mask, vis.to(emb.dtype))
    return emb


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
            silently falls back to 1-D positions.

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
        return _text_positions(input_ids, attention_mask, sections=3)

    kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    params = inspect.signature(owner.get_rope_index).parameters
    # transformers < 5.2x derives the image spans from input_ids itself and has no
    # mm_token_type_ids argument; newer versions require it.
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = mm_token_type_ids
    position_ids, deltas = owner.get_rope_index(input_ids, **kwargs)
    return position_ids, deltas.view(-1, 1).to(torch.long)


def _text_positions(input_ids, attention_mask, *, sections: int):
    # Text only: plain 1-D positions over real tokens, same in all sections; pads get 0.
    if attention_mask is None:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    else:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0) * attention_mask.long()
    position_ids = pos.unsqueeze(0).expand(sections, -1, -1).clone()
    # Positions count real tokens exactly, so the offset to the next one is zero.
    return position_ids, torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)


def mm_token_type_ids(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The processor's convention when a batch lacks it: text 0, image 1, video 2."""
    cfg = unwrap(model).config
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == cfg.image_token_id] = 1
    video = getattr(cfg, "video_token_id", None)
    if video is not None:
        mm[input_ids == video] = 2
    return mm


def positions(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Positions of a batch over its full sequence: (3, B, S) for the VL models (mRoPE,
    latent placeholders included), (B, S) for text-only decoders (pads at 0)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if not is_multimodal(model):
        return _text_positions(ids, mask, sections=1)[0][0]
    mm = batch.get("mm_token_type_ids")
    if mm is None:
        mm = mm_token_type_ids(model, ids)
    grid = batch.get("image_grid_thw") if batch.get("pixel_values") is not None else None
    return rope_positions(unwrap(model), ids, mask, grid, mm)[0]


def prompt_inputs(model: nn.Module, batch: Mapping[str, Any],
                  vision: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Embeddings (vision tokens scattered in), positions and mask of a prompt batch:
    {"embeds" [B,S,D], "position_ids" (:func:`positions`), "attention_mask", "input_ids"}.
    vision: precomputed :func:`vision_tokens` of the batch (skips the vision tower)."""
    ids = batch["input_ids"]
    if vision is None:
        vision = vision_tokens(model, batch.get("pixel_values"), batch.get("image_grid_thw"))
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    return {"embeds": embed_inputs(model, ids, vision), "position_ids": positions(model, batch),
            "attention_mask": mask, "input_ids": ids}


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_keyword(module: nn.Module) -> str:
    """The keyword a decoder's forward takes its KV cache by: ``cache`` (transformers
    >= 5.2x) or ``past_key_values`` (before); looked up once per class instead of relying
    on the deprecation shim."""
    return _cache_keyword(type(module))


def new_cache(model: nn.Module):
    """An empty DynamicCache for ``model``'s decoder."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=decoder(model).config)
    except TypeError:  # older signature
        return DynamicCache()


def new_static_cache(model: nn.Module, max_len: int):
    """An empty StaticCache for ``model``'s decoder, ``max_len`` positions per row (HF
    allocates it on the first update, at that call's batch size). Its write position
    lives on the device (a tensor in transformers >= 5.2x), so a step over it can be
    captured in a CUDA graph; :func:`run_decoder` passes ``cache_position`` to versions
    that still want it. ``cache.reset()`` empties it for reuse."""
    from transformers import StaticCache

    return StaticCache(config=unwrap(model).config, max_cache_len=max_len)


def rewind_static_cache(cache, length: int) -> None:
    """Move a :func:`new_static_cache`'s write position back to ``length`` (the positions
    past it are then overwritten by the next steps). transformers >= 5.2x keeps that
    position as a device tensor per layer (``cumulative_length``); earlier versions take
    it from the ``cache_position`` of each call, so there is nothing to move."""
    for layer in getattr(cache, "layers", []):
        if torch.is_tensor(getattr(layer, "cumulative_length", None)):
            layer.cumulative_length.fill_(length)


@functools.lru_cache(maxsize=None)
def _takes_cache_position(cls: type) -> bool:
    return "cache_position" in inspect.signature(cls.forward).parameters


def output_cache(output):
    """The cache object of an HF model output (field ``cache`` in transformers >= 5.2x,
    ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    raise RuntimeError("the HF model returned no KV cache; was use_cache=True honoured?")


def cache_layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of an HF DynamicCache, each (B Hkv S Dh)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]


def decoder_kwargs(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor,
                   cache=None, *, cache_position: torch.Tensor | None = None) -> dict[str, Any]:
    """The keyword arguments of one :func:`decoder` call (see :func:`run_decoder`), for a
    caller that runs the decoder itself (e.g. under torch.compile)."""
    kw: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
    if cache is not None:
        lm = decoder(model)
        kw[cache_keyword(lm)] = cache
        kw["use_cache"] = True
        if cache_position is not None and _takes_cache_position(type(lm)):
            kw["cache_position"] = cache_position
    else:
        kw["use_cache"] = False  # the config default (True) would build a cache nobody reads
    return kw


def run_decoder(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor,
                cache=None, *, cache_position: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder stack + final norm: embeds [B,s,D], mask [B, past+s], positions [3,B,s] (VL)
    or [B,s] -> post-norm hidden [B,s,D]. With ``cache`` (a DynamicCache or
    :func:`new_static_cache`) the step's K/V are appended to it; without, no cache is
    built. cache_position (s) long: the cache slots written, handed only to transformers
    versions whose decoder takes it (newer ones track it inside the cache)."""
    kw = decoder_kwargs(model, embeds, mask, pos, cache, cache_position=cache_position)
    return decoder(model)(**kw).last_hidden_state


def save_pretrained(model: nn.Module, path: str, **kwargs: Any) -> None:
    """``model.save_pretrained(path, **kwargs)`` without transformers' own progress bar: it
    writes carriage-return frames into a redirected log, where medlvr.progress prints lines."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def image_bounds(processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) the processor's image processor resizes every image into
    (Qwen2-VL's ``smart_resize``: the area is scaled into [min, max], each side a multiple of
    patch * merge)."""
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    lo = size.get("shortest_edge", getattr(ip, "min_pixels", None))
    hi = size.get("longest_edge", getattr(ip, "max_pixels", None))
    if lo is None or hi is None:
        raise ValueError(f"processor: its {type(ip).__name__} states no min_pixels / max_pixels")
    return int(lo), int(hi)


def set_image_bounds(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Resize every later image into [min_pixels, max_pixels] pixels. transformers 5 reads
    ``size = {"shortest_edge": min, "longest_edge": max}`` (the ``min_pixels`` / ``max_pixels``
    attributes of older releases are kept equal)."""
    import dataclasses

    ip = processor.image_processor
    size, bounds = getattr(ip, "size", None), {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    ip.size = dataclasses.replace(size, **bounds) if dataclasses.is_dataclass(size) else {**(size or {}), **bounds}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, name):
            setattr(ip, name, int(value))
