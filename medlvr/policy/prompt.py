"""The policy's prompt: how its text is written (:class:`PromptSettings`: the system turn and the
image-size bound, recorded in run.json so that training, VLPO and evaluation of a run agree),
and a prompt batch as the model reads it (embeddings, positions, mask, rows repeated).

VLPO scores the same prompts several times per step (the rollouts, the KL reference, each PPO
epoch). The positions (HF ``get_rope_index``), the mask and the left-padding check do not change
within a step, so :func:`prompt_inputs` computes them once; only the embeddings are redone
(:func:`reembed`) where the model that reads them differs: under gradients after an update (the
latent-token rows and, in full fine-tuning, every embedding train) or with the adapter switched
off for the reference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from medlvr.models import hf
from medlvr.policy.batch import Batch

__all__ = ["PromptSettings", "recorded", "prompt_inputs", "reembed"]


@dataclass(frozen=True)
class PromptSettings:
    """system_prompt: None = the checkpoint's chat template decides (Qwen2.5-VL's adds
    "You are a helpful assistant."; the embedded model's adds none); a string = that system
    turn; "" = no system turn. min_pixels / max_pixels: every image is resized into that many
    pixels (None: the processor's; :func:`medlvr.models.load` bounds a checkpoint's).
    question_template: how the question and its options are written, a named template of the
    toolkits' phrasing (medlvr/data/scoring/prompts.py, e.g. "medevalkit": "Answer with the
    option's letter from the given choices directly."); None = medlvr's own layout
    (medlvr.data.answers.format_question). A run folder's run.json holds the resolved values
    under "prompt"."""
    system_prompt: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    question_template: str | None = None

    def __post_init__(self):
        for name in ("system_prompt", "question_template"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string or None, got {getattr(self, name)!r}")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a whole number of pixels >= 1 or None, got {v!r}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels / max_pixels: expected min <= max, got {self.min_pixels} > {self.max_pixels}")

    def resolved(self, processor: Any) -> "PromptSettings":
        """These settings with the image bound the processor applies now."""
        lo, hi = hf.image_bounds(processor)
        return replace(self, min_pixels=lo, max_pixels=hi)

    def over(self, other: "PromptSettings") -> "PromptSettings":
        """``other`` with the fields set here (not None) taking precedence; system_prompt "" counts
        as set."""
        return PromptSettings(**{k: v if v is not None else getattr(other, k) for k, v in asdict(self).items()})

    def describe(self) -> str:
        system = {None: "the template's own", "": "none"}.get(self.system_prompt, repr(self.system_prompt))
        question = self.question_template or "medlvr's layout"
        return (f"system turn {system}; question as {question}; images resized into "
                f"[{self.min_pixels}, {self.max_pixels}] pixels")

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> "PromptSettings":
        """A run.json's "prompt". A run folder written before it was recorded was trained without
        a system turn (medlvr wrote none then) and with the checkpoint's own image bound:
        system_prompt "" and no bound of medlvr's (:func:`recorded`)."""
        return cls(**meta["prompt"]) if recorded(meta) else cls(system_prompt="")


def recorded(meta: dict) -> bool:
    """Whether a run.json records its prompt settings (written by this version of medlvr or later)."""
    return "prompt" in meta


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
    out = hf.prompt_inputs(model, batch.model_inputs(), vision)
    if out["position_ids"].dim() == 2:  # text-only decoder: the three sections of a text position
        out["position_ids"] = out["position_ids"][None].expand(3, -1, -1)
    if repeat > 1:
        out = {k: v.repeat_interleave(repeat, dim=1 if k == "position_ids" else 0) for k, v in out.items()}
    return out


def reembed(model: torch.nn.Module, prompt: dict[str, torch.Tensor], batch: Batch, *,
            vision: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``prompt`` (from :func:`prompt_inputs` of ``batch``) with its embeddings recomputed under
    ``model`` as it is now; positions and mask are kept."""
    repeat = prompt["input_ids"].shape[0] // batch.input_ids.shape[0]
    if vision is None:
        vision = hf.vision_tokens(model, batch.pixel_values, batch.image_grid_thw)
    emb = hf.embed_inputs(model, batch.input_ids, vision)
    return {**prompt, "embeds": emb.repeat_interleave(repeat, dim=0) if repeat > 1 else emb}
