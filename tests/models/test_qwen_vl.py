"""The Qwen-VL family facts medlvr/train builds its batches from (medlvr/models/qwen_vl.py),
checked against outside sources: the chat layout of the Qwen2.5-VL model card, the image
processor's own token expansion, and transformers' smart_resize."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from medlvr.models import build_processor, qwen_vl


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_prompt_text_is_the_templates_chat_layout(processor):
    # Qwen2.5-VL's chat format (model card): user turn with one vision block per image, then
    # the assistant header. The embedded model's template adds no system turn.
    want = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
            "<|vision_end|>Is it?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen_vl.prompt_text(processor, "Is it?", n_images=2) == want
    assert qwen_vl.prompt_text(processor, "Is it?", n_images=2, latent_start="<|latent_start|>") == \
        want + "<|latent_start|>"
    assert qwen_vl.prompt_text(processor, "q", n_images=0) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    sys = qwen_vl.prompt_text(processor, "q", n_images=0, system="Be brief.")
    assert sys == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert qwen_vl.prompt_text(processor, "q", n_images=0, system="") == \
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("size", [(224, 224), (300, 150), (56, 140), (37, 91)])
def test_grid_facts_match_the_processor(processor, size):
    w, h = size
    img = Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype("uint8"))
    enc = processor(text=[qwen_vl.prompt_text(processor, "q", n_images=1)], images=[img], return_tensors="pt")
    geo = qwen_vl.vision_geometry(processor)
    grid = enc["image_grid_thw"]
    # the processor's own expansion of the placeholder
    n_tokens = int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids(qwen_vl.IMAGE_TOKEN)).sum())
    assert qwen_vl.tokens_per_image(grid, geo.merge).tolist() == [n_tokens]
    size_cfg = processor.image_processor.size
    rh, rw = smart_resize(h, w, factor=geo.patch * geo.merge, min_pixels=size_cfg["shortest_edge"],
                          max_pixels=size_cfg["longest_edge"])
    assert qwen_vl.resized_sizes(grid, geo.patch).tolist() == [[rw, rh]]


def test_uncovered_sample():
    assert qwen_vl.uncovered_sample([4, 0, 6], [4, 2, 4]) is None
    assert qwen_vl.uncovered_sample([3, 7], [4, 6]) == 0  # sample 0 would take part of image 0
    assert qwen_vl.uncovered_sample([4, 4], [4, 6]) == 1
    assert qwen_vl.uncovered_sample([4, 6, 2], [4, 6]) == 2  # more tokens than images
    assert qwen_vl.uncovered_sample([], torch.tensor([]).tolist()) is None
