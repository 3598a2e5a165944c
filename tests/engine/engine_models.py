"""Tiny random HF models and prompt batches for the engine tests (fp32, CPU, seeded)."""
from __future__ import annotations

import torch

IMAGE, VIDEO, V_START, V_END = 5, 6, 3, 4
LATENT_START, LATENT_END, LATENT_PAD = 7, 8, 9
PATCH, MERGE, TEMPORAL = 14, 2, 2
VOCAB = 96
# Larger than HF's 0.02 so that successive latents of a random model differ enough
# for the exit rules to fire at different steps per sample.
INIT = 0.1


def qwen2_5_vl(seed: int = 0, dtype=torch.float32, cls_name: str = "Qwen2_5_VL"):
    import transformers

    cfg_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForConditionalGeneration")
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    if cls_name == "Qwen2_5_VL":
        vision.update(out_hidden_size=64, window_size=112, fullatt_block_indexes=[0], tokens_per_second=2)
    else:  # Qwen2-VL: the merger projects embed_dim -> hidden_size
        vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    cfg = cfg_cls(
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
        tie_word_embeddings=False,
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                         initializer_range=INIT,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=vision)
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype).eval()


def qwen2_text(seed: int = 0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                      attention_bias=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def gpt2(seed: int = 0, dtype=torch.float32):
    """Tiny random GPT-2 (Coconut's architecture): learned positions, LayerNorm, Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                     eos_token_id=2, pad_token_id=0, initializer_range=INIT)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def vl_sample(grid_hw, n_text: int, *, seed: int):
    """One prompt: text, an image of (h, w) patches (merged 2x2), text, <|latent_start|>.
    grid_hw None: a text-only prompt. Returns (ids (S,), pixel_values or None, grid or None)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(10, VOCAB, (n,), generator=g)  # noqa: E731
    parts = [text(2)]
    pv = grid = None
    if grid_hw is not None:
        h, w = grid_hw
        parts += [torch.tensor([V_START]), torch.full((h * w // MERGE ** 2,), IMAGE), torch.tensor([V_END])]
        pv = torch.randn(h * w, 3 * TEMPORAL * PATCH * PATCH, generator=g)
        grid = torch.tensor([[1, h, w]])
    parts += [text(n_text), torch.tensor([LATENT_START])]
    return torch.cat(parts), pv, grid


def left_pad(samples, pad_id: int = 0) -> dict:
    """Collate (ids, pv, grid) samples into a left-padded engine batch."""
    S = max(ids.numel() for ids, _, _ in samples)
    B = len(samples)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, (ids, _, _) in enumerate(samples):
        input_ids[b, S - ids.numel():] = ids
        mask[b, S - ids.numel():] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask,
             "mm_token_type_ids": (input_ids == IMAGE).int()}
    pvs = [pv for _, pv, _ in samples if pv is not None]
    if pvs:
        batch["pixel_values"] = torch.cat(pvs)
        batch["image_grid_thw"] = torch.cat([gr for _, _, gr in samples if gr is not None])
    return batch
