"""The Qwen2(.5)-VL family's batch and position facts, in one place.

What training and evaluation need to know about a Qwen-VL model to build and read its batches, so that
no layer above names a Qwen token, chat marker or vision-tower size itself. The registry
medlvr/policy/families.py picks this module by ``MODEL_TYPES`` / ``PROCESSORS``; another family
adds its own module like this one, and an engine adapter:

- the prompt from the checkpoint's chat template (:func:`prompt_text`), its image placeholder and the token that
  ends an answer (:data:`IMAGE_TOKEN`, :data:`ANSWER_END`);
- the vision tower's geometry from the processor (:func:`vision_geometry`: patch and merge
  size) and what an image's ``image_grid_thw`` row (t, h, w in patches) means: the merged
  tokens it puts in the sequence (:func:`tokens_per_image`) and the size the image was resized
  to (:func:`resized_sizes`), as the processor's ``smart_resize`` makes it (the image becomes
  ``w * patch`` x ``h * patch`` pixels, scaled independently per axis);
- which samples own which images (:func:`uncovered_sample`): images are packed in sample
  order, and a sample's image tokens are covered by a whole number of consecutive grids.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import torch

# The configs and processors this family's facts hold for (medlvr/policy/families.py reads them).
MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
PROCESSORS = ("Qwen2_5_VLProcessor", "Qwen2VLProcessor")

IMAGE_TOKEN = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
ANSWER_END = "<|im_end|>"  # closes the assistant turn: the answer's last label and the stop token
PAD_FALLBACK = "<|endoftext|>"  # the pad token when a tokenizer names none
# LoRA on the language model's attention projections only: the vision tower stays frozen (its
# tokens are stage 1's ROI targets) and so does the merger between them.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"

__all__ = ["MODEL_TYPES", "PROCESSORS", "IMAGE_TOKEN", "VISION_START", "VISION_END", "ANSWER_END", "PAD_FALLBACK", "VisionGeometry",
           "LORA_TARGETS", "prompt_text", "vision_geometry", "model_merge", "image_token", "tokens_per_image",
           "resized_sizes",
           "uncovered_sample"]


SYSTEM_TURN = "<|im_start|>system\n"
_warned_no_template: list[bool] = []
# Qwen2.5-VL-7B-Instruct's chat_template.json (Qwen/Qwen2.5-VL-7B-Instruct, as mirrored in
# tests/fixtures/qwen2_5_vl_7b_instruct/), for a processor that ships no template of its own.
DEFAULT_CHAT_TEMPLATE = (    '{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message i'
    "n messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful"
    " assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is strin"
    "g %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if conten"
    "t['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = im"
    'age_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_sta'
    "rt|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set vid"
    'eo_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% end'
    "if %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% "
    'endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assi'
    'stant\n{% endif %}')


def prompt_text(processor, question: str, *, n_images: int, system: str | None = None,
                latent_start: str | None = None) -> str:
    """The generation prompt from the processor's own chat template (the checkpoint's
    ``chat_template.json``; QwenLM/Qwen2.5-VL's fine-tuning recipe applies it the same way), one
    image placeholder per image before the processor expands it, then ``latent_start``::

        [<|im_start|>system\n{system}<|im_end|>\n]
        <|im_start|>user\n (<|vision_start|><|image_pad|><|vision_end|>) x n_images {question}<|im_end|>\n
        <|im_start|>assistant\n [latent_start]

    system: None = the template's own choice (Qwen2.5-VL's adds "You are a helpful assistant."
    when the conversation has no system turn; the embedded model's template adds none); a
    string = that system turn; "" = no system turn, also where the template would add its
    default (its turn, which this family writes as ``<|im_start|>system\n...<|im_end|>\n``, is
    removed from the front). A processor without a template gets :data:`DEFAULT_CHAT_TEMPLATE`,
    with a warning.
    """
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    template = None
    if not getattr(processor, "chat_template", None):
        template = DEFAULT_CHAT_TEMPLATE
        if not _warned_no_template:
            _warned_no_template.append(True)
            warnings.warn("processor: no chat template (the checkpoint has no chat_template.json); medlvr writes "
                          "prompts with Qwen2.5-VL-Instruct's (medlvr/models/qwen_vl.py DEFAULT_CHAT_TEMPLATE)",
                          stacklevel=3)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=template)
    if system == "" and text.startswith(SYSTEM_TURN):
        text = text[text.index(ANSWER_END + "\n") + len(ANSWER_END) + 1:]
    return text + (latent_start or "")


def image_token(processor) -> str:
    """The processor's image placeholder (the Qwen processors name it; default <|image_pad|>)."""
    return getattr(processor, "image_token", IMAGE_TOKEN)


class VisionGeometry(NamedTuple):
    patch: int  # pixels per patch side
    merge: int  # patches per merged-token side


def vision_geometry(processor) -> VisionGeometry:
    """Patch and spatial-merge size of the processor's image processor (Qwen-VL defaults 14, 2)."""
    ip = processor.image_processor
    return VisionGeometry(patch=int(getattr(ip, "patch_size", 14)), merge=int(getattr(ip, "merge_size", 2)))


def model_merge(model_config) -> int:
    """Patches per merged-token side of a Qwen-VL model (its vision config's spatial merge)."""
    return int(model_config.vision_config.spatial_merge_size)


def tokens_per_image(image_grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(I,) merged vision tokens each image puts in the sequence: t * h * w / merge^2."""
    return image_grid_thw.long().prod(-1) // (merge * merge)


def resized_sizes(image_grid_thw: torch.Tensor, patch: int) -> torch.Tensor:
    """(I, 2) (width, height) in pixels of each image as the vision tower saw it."""
    grid = image_grid_thw.long()
    return torch.stack([grid[:, 2] * patch, grid[:, 1] * patch], dim=1)


def uncovered_sample(image_tokens: Sequence[int], per_image: Sequence[int]) -> int | None:
    """The first sample whose image tokens are not covered by a whole number of consecutive
    images, walking the packed images in order (None: every sample is). ``image_tokens[b]`` is
    sample b's count of image tokens, ``per_image`` the tokens each image puts in the sequence
    (:func:`tokens_per_image`). An uncovered sample would get another sample's image features."""
    i = 0
    for b, n in enumerate(image_tokens):
        got = 0
        while got < n and i < len(per_image):
            got += int(per_image[i])
            i += 1
        if got != n:
            return b
    return None
