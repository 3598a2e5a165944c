"""Hand-built training batches for the latent tests: built from the processor, not by
medlvr.data.collate, so that the latent math is tested on its own (ragged prefixes, ROI rows,
samples without ROI)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from medlvr.ops import prepare_roi_geometry
from medlvr.policy import Batch
from medlvr.policy import roi_bins


def make_batch(processor, *, k: int, questions=("what is it?", "is the lesion on the left side?", "organ?"),
               answers=("yes", "no it is not", "liver"), sizes=((100, 100), (60, 90), (120, 80)),
               rois=((0, (10.0, 20.0, 70.0, 90.0)), (2, (0.0, 0.0, 50.0, 40.0)), (2, (30.0, 30.0, 100.0, 100.0))),
               image_seeds=None) -> Batch:
    """A batch in the layout of docs/data.md: prompts left-padded by the processor (each ends
    with <|latent_start|> in column P - 1), then the right-padded answer blocks
    <|latent_pad|>xK <|latent_end|> answer <|im_end|> from column P; rois: (sample, box in
    resized pixels)."""
    seeds = image_seeds if image_seeds is not None else range(len(sizes))
    imgs = [Image.fromarray((np.random.default_rng(s).random((h, w, 3)) * 255).astype("uint8"))
            for s, (h, w) in zip(seeds, sizes)]
    prompts = [f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
               + ("<|latent_start|>" if k else "") for q in questions]
    out = processor(text=prompts, images=imgs, return_tensors="pt", padding=True, padding_side="left",
                    return_mm_token_type_ids=True)
    tok = processor.tokenizer
    head = "<|latent_pad|>" * k + "<|latent_end|>" if k else ""
    blocks = [tok(head + a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in answers]
    n_ans = [len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for a in answers]
    B, n = len(answers), max(len(x) for x in blocks)
    suffix = torch.full((B, n), tok.pad_token_id, dtype=torch.long)
    suffix_mask = torch.zeros(B, n, dtype=torch.long)
    suffix_labels = torch.full((B, n), -100, dtype=torch.long)
    for b, (x, m) in enumerate(zip(blocks, n_ans)):
        suffix[b, :len(x)] = torch.tensor(x)
        suffix_mask[b, :len(x)] = 1
        suffix_labels[b, len(x) - m:len(x)] = torch.tensor(x[len(x) - m:])
    P = out["input_ids"].shape[1]
    grid = out["image_grid_thw"]
    roi_boxes = torch.tensor([r[1] for r in rois], dtype=torch.float32).view(-1, 4)
    roi_image = torch.tensor([r[0] for r in rois], dtype=torch.long)  # one image per sample
    return Batch(
        input_ids=torch.cat([out["input_ids"], suffix], 1),
        attention_mask=torch.cat([out["attention_mask"], suffix_mask], 1),
        pixel_values=out["pixel_values"], image_grid_thw=grid,
        mm_token_type_ids=torch.cat([out["mm_token_type_ids"], torch.zeros_like(suffix)], 1).int(),
        labels=torch.cat([torch.full_like(out["input_ids"], -100), suffix_labels], 1),
        latent_start=P if k else -1, roi_boxes=roi_boxes, roi_image=roi_image,
        roi_sample=torch.tensor([r[0] for r in rois], dtype=torch.long), answers=list(answers), k_latent=k,
        # the boxes laid out for the stage-1 alignment loss, as collate does
        roi_geometry=prepare_roi_geometry(grid, roi_boxes, roi_image, bins=roi_bins(k)) if k else None)
