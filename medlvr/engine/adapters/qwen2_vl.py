"""Qwen2-VL adapter, and the shared base of the Qwen VL family (3-section mRoPE).

Prompt positions come from HF's ``get_rope_index`` through medlvr/models/hf.py: image
tokens get (t, h, w) positions, text after an image continues from the compressed maximum,
and every step after the prompt advances all three sections together (docs/engine.md).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from medlvr.engine.adapters.base import ModelAdapter, Prefill, register
from medlvr.models import hf, qwen_vl


class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL ``*ForConditionalGeneration``: model.model.language_model is
    the decoder, model.model.visual the vision tower."""

    def _decoder(self) -> nn.Module:
        return self.model.model.language_model

    def __init__(self, model: nn.Module):
        super().__init__(model)
        section = getattr(self.decoder.rotary_emb, "mrope_section", None)
        if section is None:  # older layouts keep it only in the config (rope_scaling before 5.0)
            params = getattr(self.config, "rope_parameters", None) or getattr(self.config, "rope_scaling", None) or {}
            section = params.get("mrope_section")
        if not section or 2 * sum(section) != self.rotary_dim:
            raise ValueError(f"mrope_section must sum to head_dim/2 = {self.rotary_dim // 2}, got {section!r}")
        self.mrope_section = tuple(int(s) for s in section)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(getattr(cfg, "video_token_id", -1) or -1)
        self.merge = int(cfg.vision_config.spatial_merge_size)

    # ------------------------------------------------------------ input checks
    def check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        self._check_ids_and_mask(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        if batch.get("pixel_values_videos") is not None:
            raise ValueError("batch['pixel_values_videos']: videos are not supported by the latent engine")
        pv, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        n_img_tokens = int((ids.eq(self.image_token_id) & mask).sum())
        if (pv is None) != (grid is None):
            raise ValueError("batch['pixel_values'] and batch['image_grid_thw'] must be given together, got "
                             f"pixel_values={'set' if pv is not None else None}, "
                             f"image_grid_thw={'set' if grid is not None else None}")
        if pv is None:
            if n_img_tokens:
                raise ValueError(f"batch['input_ids'] holds {n_img_tokens} image tokens "
                                 f"(id {self.image_token_id}) but no pixel_values were given")
        else:
            if grid.dim() != 2 or grid.shape[1] != 3:
                raise ValueError(f"batch['image_grid_thw'] must have shape (I, 3), got {tuple(grid.shape)}")
            if bool((grid[:, 1:] % self.merge != 0).any()) or bool((grid <= 0).any()):
                raise ValueError(f"batch['image_grid_thw'] rows (t, h, w) must be positive with h, w divisible by "
                                 f"the spatial merge size {self.merge}, got {grid.tolist()}")
            patches = int(grid.prod(-1).sum())
            if pv.dim() != 2 or pv.shape[0] != patches:
                raise ValueError(f"batch['pixel_values'] must have {patches} rows (sum of t*h*w over "
                                 f"image_grid_thw {grid.tolist()}), got shape {tuple(pv.shape)}")
            want_tokens = patches // (self.merge ** 2)
            if n_img_tokens != want_tokens:
                raise ValueError(f"batch['input_ids'] holds {n_img_tokens} image tokens but image_grid_thw "
                                 f"{grid.tolist()} needs {want_tokens} (t*h*w / {self.merge}^2 summed)")
            # Images are consumed in order across the batch: each sample's image tokens
            # must be covered by a whole number of consecutive grids, or HF would
            # silently give one sample another's image features.
            per_image = qwen_vl.tokens_per_image(grid, self.merge).tolist()
            per_sample = (ids.eq(self.image_token_id) & mask).sum(-1).tolist()
            b = qwen_vl.uncovered_sample(per_sample, per_image)
            if b is not None:
                raise ValueError(f"batch['input_ids'] sample {b} holds {per_sample[b]} image tokens, which do not "
                                 f"match its images' grids in image_grid_thw {grid.tolist()} (tokens per image "
                                 f"{per_image})")
        mm = batch.get("mm_token_type_ids")
        if mm is not None and tuple(mm.shape) != tuple(ids.shape):
            raise ValueError(f"batch['mm_token_type_ids'] must have input_ids' shape {tuple(ids.shape)}, "
                             f"got {tuple(mm.shape)}")

    # ------------------------------------------------------------ positions
    def _mm_token_type_ids(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mm = batch.get("mm_token_type_ids")
        return mm if mm is not None else hf.mm_token_type_ids(self.model, batch["input_ids"])

    def rope_positions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """3-D prompt positions (3 B S), HF's own (0 at pad tokens)."""
        pos, _ = hf.rope_positions(self.model, batch["input_ids"], batch["attention_mask"].long(),
                                   batch.get("image_grid_thw"), self._mm_token_type_ids(batch))
        return pos

    # ------------------------------------------------------------ prompt forward
    def prefill(self, batch: Mapping[str, torch.Tensor]) -> Prefill:
        ids, mask = batch["input_ids"], batch["attention_mask"].long()
        pos = self.rope_positions(batch)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        if batch.get("pixel_values") is not None:
            kwargs.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                          mm_token_type_ids=self._mm_token_type_ids(batch))
        out = self.model.model(**kwargs)
        keys, values = self._layer_kv(out)
        # Left padding: column -1 is every sample's last prompt token, a text token, so
        # its three sections are equal and the next step is that + 1 in all three.
        next_positions = pos[:, :, -1].long() + 1
        return Prefill(hidden=out.last_hidden_state[:, -1], keys=keys, values=values,
                       next_positions=next_positions, lengths=mask.sum(-1))


@register
class Qwen2VLAdapter(QwenVLAdapter):
    model_types = ("qwen2_vl",)
