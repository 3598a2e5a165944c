"""Load a local Qwen2.5-VL / Qwen2-VL checkpoint directory offline, latent tokens added."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from medlvr.models._tokens import add_latent_tokens

_SUPPORTED = ("qwen2_5_vl", "qwen2_vl")


def load(path_or_default="default", *, dtype: torch.dtype | None = None, device=None, seed: int = 0):
    """(model, processor) from "default" (the embedded model, `seed` initialises it) or a local dir.

    A directory must hold a Qwen2.5-VL or Qwen2-VL checkpoint (config.json with model_type
    qwen2_5_vl / qwen2_vl, weights, and the processor/tokenizer files). Nothing is downloaded:
    every from_pretrained runs with local_files_only=True. The latent tokens are added to the
    tokenizer (and the embeddings resized) when the checkpoint lacks them.
    """
    from medlvr.models.default import build_default

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype or None, got {dtype!r}")
    if isinstance(path_or_default, str) and path_or_default == "default":
        model, processor = build_default(seed=seed, dtype=dtype or torch.float32)
    else:
        model, processor = _load_dir(Path(path_or_default), dtype=dtype)
    add_latent_tokens(model, processor)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, processor


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
