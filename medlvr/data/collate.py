"""Records -> model-ready tensors (the sequence layout of docs/data.md).

Sequence of one sample (the processor's chat template, here Qwen2.5-VL's with its default
system turn, which the embedded model's template leaves out; images expanded by the processor):

    [<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n]
    <|im_start|>user\n <|vision_start|><|image_pad|>xN<|vision_end|> (per image) {question}{options}<|im_end|>\n
    <|im_start|>assistant\n  <|latent_start|> <|latent_pad|>xK <|latent_end|>  {answer}<|im_end|>

with_answer=False (generation prompt) stops right after <|latent_start|> (K > 0) or after
"assistant\n" (K == 0). Prompt ids and answer ids are tokenised separately and concatenated, so
the training sequence is exactly "generation prompt + what the model should generate".

Batch layout (one for training and for prompts): the processor left-pads the prompts once, so
every prompt ends in column P - 1; the answer block (K latent pads, <|latent_end|>, answer,
<|im_end|>) starts in column P for every row and is right-padded::

    [pad .. pad  prompt_b]  [<|latent_pad|>xK <|latent_end|> answer_b <|im_end|>  pad .. pad]
     columns 0 .. P-1         columns P .. S-1 (with_answer=True only)

The latent forward (medlvr/policy/latent.py) slices columns [:P], [P:P+K] and [P+K:] directly,
and a prompt batch is the training batch's first P columns.
"""
from __future__ import annotations

import torch

from medlvr.data.answers import format_question
from medlvr.data.scoring import format_prompt
from medlvr.imageio import load_image
from medlvr.models import LATENT_START
from medlvr.ops.roi_geometry import prepare_roi_geometry
from medlvr.policy import IGNORE_INDEX, Batch, PromptSettings, families, policy_tokens, roi_bins


def prompt_text(record, processor, *, k_latent: int, system_prompt: str | None = None,
                question_template: str | None = None) -> str:
    """The generation prompt of `record` as text: the processor's own chat template (the model
    family writes the messages, e.g. medlvr/models/qwen_vl.py), one image placeholder per image
    before the processor expands it, then <|latent_start|> when K > 0. system_prompt,
    question_template: see medlvr.policy.prompt.PromptSettings."""
    question = (format_question(record.question, record.options) if question_template is None
                else format_prompt(question_template, record))
    return families.of_processor(processor).prompt_text(
        processor, question, n_images=len(record.images), system=system_prompt,
        latent_start=LATENT_START if k_latent > 0 else None)


def collate(records, processor, *, k_latent: int, with_answer: bool, latent_token_ids,
            images_cache: dict | None = None, prompt: PromptSettings | None = None) -> Batch:
    """Build a Batch from Records (see the module docstring for the sequence layout).

    Args:
        records: non-empty list of medlvr.data.records.Record.
        processor: a Qwen2(.5)-VL processor (medlvr.models.build_default / load).
        k_latent: number of <|latent_pad|> positions (0: no latent segment at all).
        with_answer: append <|latent_pad|>xK<|latent_end|>{answer}<|im_end|> and set labels
            (training); False gives the generation prompt.
        latent_token_ids: medlvr.models.latent_token_ids(processor).
        images_cache: optional dict (path, slice, window) -> PIL image, to avoid re-decoding
            across epochs.
        prompt: how the prompt is written (medlvr.policy.PromptSettings: the system turn and the
            question's layout; the image bound is the processor's); default: the template's own
            system turn and medlvr's layout.
    Returns:
        Batch in the module docstring's layout. latent_start is the prompt width P when K > 0
        (for prompts, with_answer=False, that is the sequence length S: the prompt ends with
        <|latent_start|>), -1 when K == 0.
    """
    if not records:
        raise ValueError("records: expected a non-empty list, got 0 records")
    if not isinstance(k_latent, int) or k_latent < 0:
        raise ValueError(f"k_latent: expected an int >= 0, got {k_latent!r}")
    tok = processor.tokenizer
    family = families.of_processor(processor)
    image_token = family.image_token(processor)
    image_token_id = int(tok.convert_tokens_to_ids(image_token))
    ids = policy_tokens(processor)
    pad_id, im_end_id = ids.pad, ids.stop
    lat = latent_token_ids

    images = _load_images(records, images_cache)
    orig_sizes = [im.size for im in images]

    prompt = prompt if prompt is not None else PromptSettings()
    prompts = [prompt_text(r, processor, k_latent=k_latent, system_prompt=prompt.system_prompt,
                           question_template=prompt.question_template) for r in records]
    enc = processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left")
    grid = enc["image_grid_thw"].long()
    pixel_values = enc["pixel_values"]
    prompt_ids, prompt_mask = enc["input_ids"].long(), enc["attention_mask"].long()
    P = prompt_ids.shape[1]
    if with_answer:
        head = [lat.pad] * k_latent + [lat.end] if k_latent > 0 else []
        answers = [tok(r.answer, add_special_tokens=False)["input_ids"] + [im_end_id] for r in records]
        suffix_ids, suffix_mask, suffix_labels = _right_padded(
            [head + a for a in answers], [[IGNORE_INDEX] * len(head) + a for a in answers], pad_id)
        input_ids = torch.cat([prompt_ids, suffix_ids], dim=1)
        attn = torch.cat([prompt_mask, suffix_mask], dim=1)
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), suffix_labels], dim=1)
    else:
        input_ids, attn, labels = prompt_ids, prompt_mask, torch.full_like(prompt_ids, IGNORE_INDEX)
    mm = (input_ids == image_token_id).to(torch.int32) * attn.to(torch.int32)

    # ROI boxes: original-image pixels -> pixels of the image the vision tower saw, which the
    # processor resized independently per axis (medlvr/models/qwen_vl.py), so x and y scale apart.
    vision = family.vision_geometry(processor)
    resized = family.resized_sizes(grid, vision.patch)  # (I, 2) width, height
    boxes, rimg, rsamp = _roi_rows(records, orig_sizes, resized)
    roi_boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    roi_image = torch.tensor(rimg, dtype=torch.long)
    geometry = None
    if with_answer and k_latent > 0:
        # The stage-1 alignment loss's box checks and kernel tables, once per batch here on
        # the CPU (the loader), so the loss call on the GPU neither syncs nor recomputes them.
        geometry = prepare_roi_geometry(grid, roi_boxes, roi_image, bins=roi_bins(k_latent), patch=vision.patch,
                                        merge=vision.merge)
    return Batch(
        input_ids=input_ids, attention_mask=attn, pixel_values=pixel_values, image_grid_thw=grid,
        mm_token_type_ids=mm, labels=labels, latent_start=P if k_latent > 0 else -1,
        roi_boxes=roi_boxes, roi_image=roi_image, roi_sample=torch.tensor(rsamp, dtype=torch.long),
        answers=[r.answer for r in records], records=list(records),
        image_sizes=torch.tensor(orig_sizes, dtype=torch.long).reshape(-1, 2), resized_sizes=resized,
        k_latent=k_latent, roi_geometry=geometry,
    )


def _load_images(records, images_cache: dict | None) -> list:
    """Every image of the batch in packing order (sample, then image), as 8-bit RGB: DICOM,
    NIfTI, 16-bit PNG/TIFF and 8-bit images alike keep their original pixel grid
    (medlvr/imageio/reader.py), so the ROI scaling of :func:`_roi_rows` holds."""
    images = []
    for r in records:
        for j, p in enumerate(r.images):
            key = (p, r.slice_of(j), r.window)
            im = images_cache.get(key) if images_cache is not None else None
            if im is None:
                im = load_image(p, index=r.slice_of(j), window=r.window)
                if images_cache is not None:
                    images_cache[key] = im
            images.append(im)
    return images


def _roi_rows(records, orig_sizes: list[tuple[int, int]], resized: torch.Tensor
              ) -> tuple[list[list[float]], list[int], list[int]]:
    """(boxes in resized pixels, image index, sample index) of every ROI, in record order."""
    boxes, rimg, rsamp = [], [], []
    first = 0  # the record's first image in packing order
    for b, r in enumerate(records):
        for roi in r.rois:
            i = first + roi.image
            ow, oh = orig_sizes[i]
            sx, sy = float(resized[i, 0]) / ow, float(resized[i, 1]) / oh
            x0, y0, x1, y1 = roi.box
            boxes.append([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
            rimg.append(i)
            rsamp.append(b)
        first += len(r.images)
    return boxes, rimg, rsamp


def _right_padded(seqs: list[list[int]], labels: list[list[int]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels) [B, max len] of the answer blocks, each starting in column 0."""
    n = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), n), int(pad_id), dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, (x, y) in enumerate(zip(seqs, labels)):
        ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        lab[b, :len(y)] = torch.tensor(y, dtype=torch.long)
        mask[b, :len(x)] = 1
    return ids, mask, lab
