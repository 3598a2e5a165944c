"""Hand-built training batches for the latent tests: independent of medlvr.train.collate so that
the latent math is tested on its own (ragged prefixes, ROI rows, samples without ROI)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from medlvr.ops import prepare_roi_geometry
from medlvr.train.roi import roi_bins


def make_batch(processor, *, k: int, questions=("what is it?", "is the lesion on the left side?", "organ?"),
               answers=("yes", "no it is not", "liver"), sizes=((100, 100), (60, 90), (120, 80)),
               rois=((0, (10.0, 20.0, 70.0, 90.0)), (2, (0.0, 0.0, 50.0, 40.0)), (2, (30.0, 30.0, 100.0, 100.0))),
               image_seeds=None) -> dict:
    """Right-padded batch in the layout of docs/data.md; rois: (sample, box in resized pixels)."""
    seeds = image_seeds if image_seeds is not None else range(len(sizes))
    imgs = [Image.fromarray((np.random.default_rng(s).random((h, w, 3)) * 255).astype("uint8"))
            for s, (h, w) in zip(seeds, sizes)]
    latent = "<|latent_start|>" + "<|latent_pad|>" * k + "<|latent_end|>" if k else ""
    prompts = [f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
               for q in questions]
    texts = [pr + latent + a + "<|im_end|>" for pr, a in zip(prompts, answers)]
    processor.tokenizer.padding_side = "right"
    out = processor(text=texts, images=imgs, return_tensors="pt", padding=True, return_mm_token_type_ids=True)
    ids = out["input_ids"]
    tok = processor.tokenizer
    labels = torch.full_like(ids, -100)
    s0 = []
    for b, a in enumerate(answers):
        n = int(out["attention_mask"][b].sum())
        n_ans = len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"])
        labels[b, n - n_ans:n] = ids[b, n - n_ans:n]
        if k:
            s0.append(int((ids[b] == tok.convert_tokens_to_ids("<|latent_pad|>")).nonzero()[0]))
        else:
            s0.append(-1)
    batch = dict(out)
    batch["labels"] = labels
    batch["latent_start_index"] = torch.tensor(s0)
    batch["roi_boxes"] = torch.tensor([r[1] for r in rois], dtype=torch.float32).view(-1, 4)
    batch["roi_sample"] = torch.tensor([r[0] for r in rois], dtype=torch.long)
    batch["roi_image"] = torch.tensor([r[0] for r in rois], dtype=torch.long)  # one image per sample
    if k:  # the boxes laid out for the stage-1 alignment loss, as collate does
        batch["roi_geometry"] = prepare_roi_geometry(batch["image_grid_thw"], batch["roi_boxes"], batch["roi_image"],
                                                     bins=roi_bins(k))
    return batch
