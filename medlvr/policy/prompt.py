"""A prompt batch as the model reads it: embeddings, positions, mask, rows repeated.

VLPO scores the same prompts several times per step (the rollouts, the KL reference, each PPO
epoch). The positions (HF ``get_rope_index``), the mask and the left-padding check do not change
within a step, so :func:`prompt_inputs` computes them once; only the embeddings are redone
(:func:`reembed`) where the model that reads them differs: under gradients after an update (the
latent-token rows and, in full fine-tuning, every embedding train) or with the adapter switched
off for the reference.
"""
from __future__ import annotations

import torch

from medlvr.models import hf
from medlvr.policy.batch import Batch

__all__ = ["prompt_inputs", "reembed"]


def _embeds(model: torch.nn.Module, batch: Batch, repeat: int, vision: torch.Tensor | None) -> torch.Tensor:
    if vision is None:
        vision = hf.vision_tokens(model, batch.pixel_values, batch.image_grid_thw)
    emb = hf.embed_inputs(hf.unwrap(model), batch.input_ids, vision)
    return emb.repeat_interleave(repeat, dim=0) if repeat > 1 else emb


def prompt_inputs(model: torch.nn.Module, batch: Batch, *, repeat: int = 1,
                  vision: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Embeddings, positions and mask of a left-padded prompt batch, each row repeated
    ``repeat`` times (row i*repeat + j is rollout j of prompt i): embeds [B*n,P,D],
    position_ids [3,B*n,P], attention_mask [B*n,P], input_ids [B*n,P].

    The vision tower runs once per prompt, not once per rollout: the image features are
    scattered into the prompt embeddings and the embeddings are repeated. vision: the batch's
    merged vision tokens (skips the vision tower)."""
    if bool((batch.attention_mask[:, -1] == 0).any()):
        raise ValueError("batch.attention_mask: prompts must be left-padded (attention_mask[:, -1] must be all 1), "
                         "got a row ending in padding")
    base = hf.unwrap(model)
    pos = hf.positions(base, batch.model_inputs())
    if pos.dim() == 2:  # text-only decoder: the three sections of a text position
        pos = pos[None].expand(3, -1, -1)
    out = {"embeds": _embeds(model, batch, 1, vision), "position_ids": pos,
           "attention_mask": batch.attention_mask, "input_ids": batch.input_ids}
    if repeat > 1:
        out = {k: v.repeat_interleave(repeat, dim=1 if k == "position_ids" else 0) for k, v in out.items()}
    return out


def reembed(model: torch.nn.Module, prompt: dict[str, torch.Tensor], batch: Batch, *,
            vision: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``prompt`` (from :func:`prompt_inputs` of ``batch``) with its embeddings recomputed under
    ``model`` as it is now; positions and mask are kept."""
    repeat = prompt["input_ids"].shape[0] // batch.input_ids.shape[0]
    return {**prompt, "embeds": _embeds(model, batch, repeat, vision)}
