"""The embedded default model, offline loading of local checkpoints, latent tokens, positions."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medlvr.models import (LatentTokens, build_default, latent_token_ids, load, rope_positions)
from medlvr.models.build_tokenizer import LATENT_TOKENS, QWEN_SPECIAL_TOKENS, build_json, TOKENIZER_FILE


@pytest.fixture(scope="module")
def default():
    return build_default(seed=0)


def _img(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def test_shipped_tokenizer_equals_fresh_build():
    # The shipped file is generated; a diff means someone edited one without the other.
    assert TOKENIZER_FILE.read_text(encoding="utf-8") == build_json()


def test_default_config_is_small_and_consistent(default):
    model, processor = default
    cfg = model.config
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    assert len(processor.tokenizer) <= cfg.text_config.vocab_size
    tok = processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_special_tokens_are_single_ids(default):
    _, processor = default
    tok = processor.tokenizer
    for t in QWEN_SPECIAL_TOKENS + LATENT_TOKENS:
        ids = tok(f"a{t}b", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(t) in ids, t
    ids = latent_token_ids(processor)
    assert isinstance(ids, LatentTokens) and len(set(ids)) == 3
    text = "Is the lesion in the upper left? 123 Ünïcode"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_seeded_init_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m1, _ = build_default(seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    m2, _ = build_default(seed=1)
    m3, _ = build_default(seed=2)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_processor_expands_images_to_fixed_grid(default):
    _, processor = default
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    out = processor(text=[text, text], images=[_img(200, 200), _img(512, 512, 1)], return_tensors="pt", padding=True)
    assert out["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((out["input_ids"] == image_id).sum(1) == 16).all()
    mm = out["mm_token_type_ids"]
    assert torch.equal(mm.bool(), out["input_ids"] == image_id)


def test_rope_positions_match_hf_forward_and_compress_after_image(default):
    model, processor = default
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is there a lesion?<|im_end|>\n"
    out = processor(text=[text], images=[_img(112, 112)], return_tensors="pt")
    ids = out["input_ids"]
    pos, deltas = rope_positions(model, ids, out["attention_mask"], out["image_grid_thw"], out["mm_token_type_ids"])
    assert pos.shape == (3, 1, ids.shape[1]) and deltas.shape == (1, 1)
    # 16 image tokens on a 4x4 grid occupy 4 positions along each axis: 12 fewer than tokens.
    assert int(deltas) == -12
    assert int(pos[:, 0, -1].max()) == ids.shape[1] - 1 + int(deltas)
    # HF's forward with mm_token_type_ids computes the same positions: explicit positions give
    # identical logits.
    with torch.no_grad():
        a = model(**out).logits
        b = model(**out, position_ids=pos).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rope_positions_rejects_missing_mm_token_type_ids(default):
    model, _ = default
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        rope_positions(model, ids, None, torch.tensor([[1, 8, 8]]), None)


def test_default_roundtrips_through_save_pretrained_and_load(default, tmp_path):
    model, processor = default
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    m2, p2 = load(str(tmp_path), dtype=torch.float32)
    assert type(m2).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert latent_token_ids(p2) == latent_token_ids(processor)
    s1, s2 = model.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    o1 = processor(text=[text], images=[_img(150, 90)], return_tensors="pt")
    o2 = p2(text=[text], images=[_img(150, 90)], return_tensors="pt")
    assert all(torch.equal(o1[k], o2[k]) for k in o1)


def _tiny_qwen2_vl(tmp_path):
    """A tiny Qwen2-VL checkpoint directory whose tokenizer lacks the latent tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    words = ["hi", "yes", "no", "lesion", "user", "assistant", "\n", " ", "?"]
    vocab = {t: i for i, t in enumerate(QWEN_SPECIAL_TOKENS + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="hi"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="isolated")
    tk.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    kw = dict(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}, patch_size=14, merge_size=2,
              temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**kw))
    v = len(vocab)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    return model, v


def test_qwen2_vl_checkpoint_loads_with_latent_tokens_added(tmp_path):
    orig, v = _tiny_qwen2_vl(tmp_path)
    model, processor = load(str(tmp_path))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    ids = latent_token_ids(processor)
    assert sorted(ids) == [v, v + 1, v + 2]
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == v + 3
    old = orig.get_input_embeddings().weight
    torch.testing.assert_close(emb[:v], old)
    for i in ids:  # mean-initialised, not random
        torch.testing.assert_close(emb[i], old.mean(0))
    head = model.get_output_embeddings().weight
    torch.testing.assert_close(head[ids.pad], orig.get_output_embeddings().weight.mean(0))
    # The latent tokens are single special tokens and the model runs on a prompt using them.
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|><|latent_start|><|latent_pad|><|latent_end|>"
    out = processor(text=[text], images=[_img(60, 60)], return_tensors="pt")
    assert (out["input_ids"] == ids.pad).sum() == 1
    pos, _ = rope_positions(model, out["input_ids"], out["attention_mask"], out["image_grid_thw"],
                            (out["input_ids"] == model.config.image_token_id).int())
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape[-1] == v + 3 and torch.isfinite(logits).all()
    # collate works with a loaded (non-default) processor too.
    from medlvr.data.collate import collate
    from medlvr.data.records import ROI, Record

    path = tmp_path / "img.png"
    _img(80, 60).save(path)
    rec = Record(id="a", images=[str(path)], question="hi lesion", options=None, answer="yes",
                 rois=[ROI(0, (8.0, 6.0, 40.0, 30.0))])
    b = collate([rec, rec], processor, k_latent=2, with_answer=True, latent_token_ids=ids)
    assert (b.input_ids == ids.pad).sum() == 4 and (b.labels != -100).sum() == 4  # "yes" + <|im_end|>, twice
    assert b.mm_token_type_ids.sum() == 2 * int(b.image_grid_thw[0].prod()) // 4
    with torch.no_grad():
        assert torch.isfinite(model(**b.model_inputs(), labels=b.labels).loss)


def test_load_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        load(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        load(str(tmp_path / "nope"))


def test_latent_token_ids_names_missing_tokens():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab={"a": 0}, unk_token="a")))
    with pytest.raises(ValueError, match="latent_start"):
        latent_token_ids(tok)
