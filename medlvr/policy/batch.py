"""The batch layout of the latent policy, its one check, and the latent shift.

One layout for training and for prompts (medlvr/data/collate.py builds it; docs/data.md)::

    [pad .. pad  prompt_b]  [<|latent_pad|>xK <|latent_end|> answer_b <|im_end|>  pad .. pad]
     columns 0 .. P-1         columns P .. S-1 (training batches only)

The processor left-pads the prompts, so every prompt ends in column P - 1 (with
<|latent_start|> when K > 0) and the answer block starts in column P for every row, right-padded.
A prompt batch is a training batch's first P columns.

The shift (binding for both stages): the input fed at latent column P + t is
z_t = feedback(h[P + t - 1]), h the post-final-norm hidden state, so z_0 comes from
<|latent_start|>; VLPO's mu_t is the current policy's h at the same column P + t - 1.
:func:`latent_mu` is the one place that index is written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from medlvr.ops.roi_geometry import RoiGeometry

__all__ = ["Batch", "MODEL_INPUTS", "IGNORE_INDEX", "latent_start", "latent_mu", "roi_bins"]

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor            # (B, S) long
    attention_mask: torch.Tensor       # (B, S) long, 1 = real token
    pixel_values: torch.Tensor         # (P, C*T*patch*patch) flattened patches of all images
    image_grid_thw: torch.Tensor       # (I, 3) long, images in packing order (sample, then image)
    mm_token_type_ids: torch.Tensor    # (B, S) int, 1 at <|image_pad|> tokens
    labels: torch.Tensor               # (B, S) long, IGNORE_INDEX except answer tokens + <|im_end|>
    latent_start: int                  # column P of every row's first <|latent_pad|> (prompts end at
                                       # P - 1); -1 when K == 0
    roi_boxes: torch.Tensor            # (R, 4) float, x0 y0 x1 y1 in pixels of the RESIZED image
    roi_image: torch.Tensor            # (R,) long, index into image_grid_thw
    roi_sample: torch.Tensor           # (R,) long, sample owning the box
    answers: list[str]
    records: list = field(default_factory=list)
    image_sizes: torch.Tensor | None = None    # (I, 2) original (width, height)
    resized_sizes: torch.Tensor | None = None  # (I, 2) resized (width, height) fed to the vision tower
    k_latent: int = 0
    roi_geometry: RoiGeometry | None = None  # the boxes checked and laid out for roi_align_loss (training, K > 0)

    def model_inputs(self) -> dict:
        """The keyword arguments of a Qwen2(.5)-VL forward / the engine's generate: the one
        bridge from a Batch (read by attribute in medlvr/train) to the mapping that
        medlvr/models and medlvr/engine take."""
        return {k: getattr(self, k) for k in MODEL_INPUTS}

    @classmethod
    def prompts(cls, inputs, *, k_latent: int = 0) -> "Batch":
        """A prompt batch (no answers, no ROIs) from model inputs that already have the layout:
        left-padded prompts ending in the last column, e.g. a processor's output with
        padding_side="left". K > 0: the first latent goes in column S (latent_start)."""
        missing = [k for k in ("input_ids", "attention_mask", "mm_token_type_ids") if inputs.get(k) is None]
        if missing:
            raise ValueError(f"inputs: expected the model inputs {MODEL_INPUTS}, missing {missing}")
        ids = inputs["input_ids"]
        empty = torch.zeros(0, dtype=torch.long, device=ids.device)
        return cls(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=inputs.get("pixel_values"),
                   image_grid_thw=inputs.get("image_grid_thw"), mm_token_type_ids=inputs["mm_token_type_ids"],
                   labels=torch.full_like(ids, IGNORE_INDEX), latent_start=ids.shape[1] if k_latent > 0 else -1,
                   roi_boxes=torch.zeros(0, 4, device=ids.device), roi_image=empty, roi_sample=empty,
                   answers=[""] * ids.shape[0], k_latent=k_latent)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """Every tensor (and the ROI geometry) on ``device``; records and answers ride along.
        accelerate's DataLoader calls this for each batch it yields."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, (torch.Tensor, RoiGeometry)) else v
        return Batch(**kw)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def latent_start(batch: Batch, k: int) -> int:
    """The latent start column P of a batch in collate's layout (medlvr/data/collate.py),
    checked before any model work: every prefix ends in column P - 1 (left-padded, so its
    last column is real), the K latent columns are real in every row, and the suffix after
    them is right-padded. One host read of the mask for all checks."""
    p = batch.latent_start
    am = batch.attention_mask
    if isinstance(p, bool) or not isinstance(p, int):
        raise ValueError(f"batch.latent_start: expected an int (collate's latent start column), got {p!r}")
    if k < 1 or p < 1 or p + k > am.shape[1]:
        raise ValueError(f"batch.latent_start: expected 1 <= latent_start and latent_start + K <= "
                         f"{am.shape[1]} columns with K >= 1, got latent_start={p} K={k}")
    m = am.bool()
    prefix, latents, suffix = m[:, :p], m[:, p:p + k], m[:, p + k:]
    ok = torch.stack([
        prefix[:, -1].all(),                                                  # every prefix ends at P - 1
        (prefix[:, 1:] >= prefix[:, :-1]).all() if p > 1 else m.new_ones(()),  # left-padded prefix
        latents.all(),                                                        # K real latent columns
        (suffix[:, 1:] <= suffix[:, :-1]).all() if suffix.shape[1] > 1 else m.new_ones(()),  # right-padded
    ]).tolist()
    if not all(ok):
        what = ("a prefix that does not end in column latent_start - 1", "a prefix that is not left-padded",
                "a padded latent column", "a suffix that is not right-padded")[ok.index(False)]
        raise ValueError(f"batch.attention_mask: expected collate's layout [left-padded prefix | K latents | "
                         f"right-padded suffix] with latent_start={p}, got {what}")
    return p


def latent_mu(hidden: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """hidden [B,S,D] -> [B,K,D] with row t = hidden[:, P + t - 1], P = ``start`` (the batch's
    latent_start): the state that produced z_t."""
    return hidden[:, start - 1:start - 1 + k]


def roi_bins(k: int) -> tuple[int, int]:
    """(gh, gw) with gh * gw = K, as square as possible (gh <= gw): 4 -> (2,2), 8 -> (2,4), 6 -> (2,3)."""
    if k < 1:
        raise ValueError(f"k: expected >= 1 latent steps for ROI bins, got {k}")
    gh = int(math.isqrt(k))
    while k % gh:
        gh -= 1
    return gh, k // gh
