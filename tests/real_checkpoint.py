"""A Qwen2.5-VL-7B-Instruct checkpoint folder as it ships, at tiny widths, built at test time.

The checkpoint's own small files (tests/fixtures/qwen2_5_vl_7b_instruct/, PROVENANCE.md there):
its chat template, image processor (dynamic resolution: min_pixels 3136, max_pixels 12845056),
generation config and model config. The vocabulary is the embedded model's (it carries Qwen's
special tokens, with other ids), so the ids in the configs are mapped by token string. The
weights are random (seeded) at the real architecture with every width shrunk."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "qwen2_5_vl_7b_instruct"
# The real configs' token ids and the tokens they name (tokenizer_config.json's added_tokens_decoder).
REAL_IDS = {151643: "<|endoftext|>", 151645: "<|im_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>",
            151654: "<|vision_pad|>", 151655: "<|image_pad|>", 151656: "<|video_pad|>"}


def real_file(name: str) -> dict:
    return json.loads((FIXTURE / name).read_text())


def _mapped(value, ids: dict[int, int]):
    if isinstance(value, list):
        return [ids[v] for v in value]
    return ids[value]


def build_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """Write the checkpoint folder at ``path`` (model.safetensors, config.json, the tokenizer,
    chat_template.json, preprocessor_config.json, generation_config.json); returns ``path``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from medlvr.models.default import build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {real: tok.convert_tokens_to_ids(s) for real, s in REAL_IDS.items()}
    cfg = real_file("config.json")
    for key in ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id",
                "image_token_id", "video_token_id"):
        cfg[key] = _mapped(cfg[key], ids)
    # tiny widths, the real structure (mRoPE sections scaled to the smaller head: 16 -> 3 x 8 / 16)
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_window_layers=2, vocab_size=1024, rope_theta=10000.0,
               rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, torch_dtype="float32")
    cfg["vision_config"].update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for name in ("chat_template.json", "preprocessor_config.json"):
        shutil.copy(FIXTURE / name, path / name)
    gen = real_file("generation_config.json")
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        gen[key] = _mapped(gen[key], ids)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path
