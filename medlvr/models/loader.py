"""Load a local Qwen2.5-VL / Qwen2-VL checkpoint directory offline, latent tokens added."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from medlvr.models._tokens import add_latent_tokens
from medlvr.models.hf import image_bounds, set_image_bounds

_SUPPORTED = ("qwen2_5_vl", "qwen2_vl")
# The image-size bound of a checkpoint directory when the caller sets none: at most 1280 merged
# vision tokens per image (1280 * 28 * 28 pixels), the upper end of the "token range of 256-1280" that
# the Qwen2.5-VL-7B-Instruct model card (README.md, remodlai/qwen-2.5-vl-7b-instruct-lexiq@cc59489) gives for
# balancing performance and cost. The checkpoint's own max_pixels (12,845,056: about
# 16k tokens, so a 3000 x 2500 radiograph is about 9,500) stays available by asking for it.
DEFAULT_MAX_PIXELS = 1280 * 28 * 28


def load(path_or_default="default", *, dtype: torch.dtype | None = None, device=None, seed: int = 0,
         min_pixels: int | None = None, max_pixels: int | None = None, cap_max_pixels: bool = True):
    """(model, processor) from "default" (the embedded model, `seed` initialises it) or a local dir.

    A directory must hold a Qwen2.5-VL or Qwen2-VL checkpoint (config.json with model_type
    qwen2_5_vl / qwen2_vl, weights, and the processor/tokenizer files). Nothing is downloaded:
    every from_pretrained runs with local_files_only=True. The latent tokens are added to the
    tokenizer (and the embeddings resized) when the checkpoint lacks them.

    min_pixels / max_pixels: the image-size bound the processor resizes every image into. None
    keeps the processor's own, except that a checkpoint directory's max_pixels is capped at
    :data:`DEFAULT_MAX_PIXELS` (the embedded model keeps its fixed 112 x 112); cap_max_pixels=False
    keeps the checkpoint's (a run trained before medlvr bounded images).
    """
    from medlvr.models.default import build_default

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype or None, got {dtype!r}")
    if isinstance(path_or_default, str) and path_or_default == "default":
        model, processor = build_default(seed=seed, dtype=dtype or torch.float32)
    else:
        model, processor = _load_dir(Path(path_or_default), dtype=dtype)
        if max_pixels is None and cap_max_pixels:
            max_pixels = min(image_bounds(processor)[1], DEFAULT_MAX_PIXELS)
    _bound_images(processor, min_pixels, max_pixels)
    add_latent_tokens(model, processor)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, processor


def _bound_images(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    lo, hi = image_bounds(processor)
    lo = lo if min_pixels is None else min_pixels
    hi = hi if max_pixels is None else max_pixels
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a whole number of pixels >= 1, got {v!r}")
    if lo > hi:
        raise ValueError(f"min_pixels / max_pixels: expected min_pixels <= max_pixels, got {lo} > {hi}")
    set_image_bounds(processor, lo, hi)


def _load_dir(path: Path, *, dtype):
    from transformers import (AutoProcessor, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ValueError(f"path: expected 'default' or a local checkpoint directory, got {str(path)!r} (not a directory)")
    if not cfg_file.is_file():
        raise ValueError(f"path: expected a checkpoint directory with config.json, got {str(path)!r} (no config.json)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in _SUPPORTED:
        raise ValueError(f"{cfg_file}: expected model_type in {_SUPPORTED}, got {model_type!r}")
    cls = Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls.from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor
