"""The embedded default model: a small Qwen2.5-VL built from medlvr/models/assets/ (no download)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from medlvr.models._tokens import LATENT_TOKEN_STRINGS
from medlvr.models.build_tokenizer import QWEN_SPECIAL_TOKENS

ASSETS = Path(__file__).resolve().parent / "assets"

# Qwen's chat template without the default system prompt, so that the prompt layout is the one
# in docs/data.md: <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>text<|im_end|>\n...
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_config():
    """The Qwen2_5_VLConfig of the embedded model (assets/config.json)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**json.loads((ASSETS / "config.json").read_text()))


def image_processor_kwargs() -> dict:
    """Image processor settings: min_pixels = max_pixels = 112*112, so every square image is
    resized to 112x112 = an 8x8 patch grid = 4x4 = 16 merged vision tokens."""
    cfg = json.loads((ASSETS / "preprocessor_config.json").read_text())
    cfg.pop("image_processor_type", None)
    return cfg


def build_tokenizer():
    """The shipped tokenizer (assets/tokenizer.json) as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    vocab = tok.get_vocab()
    for t in list(QWEN_SPECIAL_TOKENS) + list(LATENT_TOKEN_STRINGS):
        if t not in vocab:  # guards a hand-edited tokenizer.json
            raise ValueError(f"{ASSETS / 'tokenizer.json'}: special token {t} missing; rebuild with "
                             "python -m medlvr.models.build_tokenizer")
    return tok


def build_processor():
    """Qwen2_5_VLProcessor over the shipped tokenizer and the fixed-size image processor."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    kw = image_processor_kwargs()
    # The processor class insists on a video processor; medlvr feeds no video.
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=build_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=CHAT_TEMPLATE,
    )


def build_default(*, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, processor) of the embedded small Qwen2.5-VL, randomly initialised from `seed`.

    The global torch RNG is left untouched (the init runs under a forked RNG), so building a
    model in the middle of a seeded run does not change that run's later random draws.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not isinstance(seed, int):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {dtype!r}")
    config = default_config()
    processor = build_processor()
    n_tok = len(processor.tokenizer)
    if n_tok > config.text_config.vocab_size:
        raise ValueError(f"assets: tokenizer has {n_tok} tokens > config vocab_size {config.text_config.vocab_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to(dtype=dtype)
    model.eval()
    return model, processor
