"""Qwen2.5-VL-7B-Instruct's own files (tests/real_checkpoint.py): medlvr's prompts are the
checkpoint's chat template, its image-size bound is medlvr's to set and recorded with the run,
and evaluation answers do not depend on the batch size on ragged, mixed-size batches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _threads import one_thread  # noqa: F401  (autouse fixture)
from medlvr.data.answers import format_question
from medlvr.data.collate import collate
from medlvr.data.records import Record
from medlvr.eval.evaluate import evaluate
from medlvr.models import load
from medlvr.models.hf import image_bounds
from medlvr.policy import PromptSettings, build_trainable, load_trained, policy_tokens
from medlvr.train.loop import LoopConfig
from medlvr.train.sft import Stage1Config, train_stage1
from real_checkpoint import build_checkpoint, real_file

# The image sizes of the check: grey, RGB, tall, tiny, wide, 16-bit.
SIZES = [((512, 640), "L"), ((224, 224), "RGB"), ((1024, 768), "RGB"), ((300, 900), "RGB"), ((60, 40), "RGB"),
         ((1200, 150), "RGB"), ((320, 256), "I;16")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen") / "ckpt")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, ((w, h), mode) in enumerate(SIZES):
        if mode == "I;16":
            im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
        else:
            im = Image.fromarray(rng.integers(0, 255, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8))
        p = d / f"im{i}.png"
        im.save(p)
        paths.append(str(p))
    out = []
    for i, p in enumerate(paths):
        images = [p] if i % 3 else [p, paths[(i + 2) % len(paths)]]  # records 0, 3, 6: two images
        options = ["left", "right"] if i % 2 else None
        out.append(Record(id=f"r{i}", images=images, question=f"Where is finding {i}?", options=options,
                          answer="left", split="test", source="fixture", qtype="location"))
    return out


def _messages(record, system):
    """The conversation as Hugging Face's chat format writes it (the processor's documented input)."""
    content = [{"type": "image"} for _ in record.images] + [
        {"type": "text", "text": format_question(record.question, record.options)}]
    msgs = [{"role": "user", "content": content}]
    if system:
        msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return msgs


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("system", [None, "You are a radiologist."])
def test_prompt_ids_are_the_checkpoints_chat_template(checkpoint, records, k, system):
    model, processor = load(checkpoint)
    ids = policy_tokens(processor)
    for rec in (records[0], records[1], records[3]):  # 2 images; 1 image with options; 2 images, options
        text = processor.apply_chat_template(_messages(rec, system), tokenize=False, add_generation_prompt=True)
        if system is None:
            assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        text += "<|latent_start|>" if k else ""
        want = processor(text=[text], images=[Image.open(p) for p in rec.images], return_tensors="pt")
        got = collate([rec], processor, k_latent=k, with_answer=False, latent_token_ids=ids.latent,
                      prompt=PromptSettings(system_prompt=system))
        assert torch.equal(got.input_ids, want["input_ids"])
        assert torch.equal(got.image_grid_thw, want["image_grid_thw"])
        assert torch.equal(got.pixel_values, want["pixel_values"])


def test_an_empty_system_prompt_leaves_the_turn_out(checkpoint, records):
    _, processor = load(checkpoint)
    b = collate(records[1:2], processor, k_latent=0, with_answer=False,
                latent_token_ids=policy_tokens(processor).latent, prompt=PromptSettings(system_prompt=""))
    text = processor.tokenizer.decode(b.input_ids[0])
    assert text.startswith("<|im_start|>user\n") and "system" not in text


def test_image_bounds_default_flag_and_run_json_round_trip(checkpoint, records, tmp_path):
    assert real_file("preprocessor_config.json")["max_pixels"] == 12845056
    model, processor = load(checkpoint)
    assert image_bounds(processor) == (3136, 1280 * 28 * 28)  # the checkpoint's 12.8 MP is capped
    ids = policy_tokens(processor).latent
    big = collate(records[2:3], processor, k_latent=0, with_answer=False, latent_token_ids=ids)
    assert int(big.image_grid_thw.prod()) // 4 == 999  # 1024 x 768 under the default bound
    model, processor = load(checkpoint, max_pixels=200_704)
    small = collate(records[2:3], processor, k_latent=0, with_answer=False, latent_token_ids=ids)
    assert int(small.image_grid_thw.prod()) // 4 <= 256
    with pytest.raises(ValueError, match="min_pixels"):
        load(checkpoint, min_pixels=10**6, max_pixels=10**5)
    # sft records the settings; load_trained reads them back, a flag overrides one field
    prompt = PromptSettings(system_prompt="You are a radiologist.", max_pixels=200_704)
    lm = build_trainable(model, processor, Stage1Config(k_latent=1, lora=True, lora_r=2), prompt=prompt)
    last = train_stage1(lm, processor, records[:4], LoopConfig(out_dir=str(tmp_path), max_steps=1, batch_size=2,
                                                               progress=False), base=str(checkpoint))
    meta = json.loads((tmp_path / "final" / "run.json").read_text())
    assert meta["prompt"] == {"system_prompt": "You are a radiologist.", "min_pixels": 3136, "max_pixels": 200_704,
                              "question_template": None}
    lm2, processor2, _ = load_trained(last["final_dir"])
    assert lm2.prompt == PromptSettings("You are a radiologist.", 3136, 200_704)
    assert image_bounds(processor2) == (3136, 200_704)
    lm3, processor3, _ = load_trained(last["final_dir"], prompt=PromptSettings(max_pixels=100_352))
    assert lm3.prompt.system_prompt == "You are a radiologist." and image_bounds(processor3)[1] == 100_352
    # a run folder written before the prompt was recorded: trained without a system turn, with the
    # checkpoint's own image bound, and read back that way
    del meta["prompt"]
    (tmp_path / "final" / "run.json").write_text(json.dumps(meta))
    lm4, processor4, _ = load_trained(last["final_dir"])
    assert lm4.prompt.system_prompt == "" and image_bounds(processor4) == (3136, 12845056)


@pytest.mark.parametrize("k", [0, 2])
def test_eval_answers_do_not_depend_on_the_batch_size(checkpoint, records, k):
    model, processor = load(checkpoint)
    lm = build_trainable(model, processor, Stage1Config(k_latent=k))
    many = records * 5  # 35 records: one batch of 32 and one of 3, both ragged and mixed
    runs = {bs: evaluate(lm, processor, many, batch_size=bs, max_new_tokens=4, progress=False)
            for bs in (1, 32)}
    one, batched = ([p["prediction"] for p in runs[bs].predictions] for bs in (1, 32))
    assert one == batched


def test_eval_states_and_honours_the_generation_config(checkpoint, records):
    """The checkpoint asks for do_sample=True at temperature 1e-6 and repetition_penalty 1.05:
    evaluation decodes greedily (said in its notice) with the penalty, and its answers are HF
    generate's greedy answers with that penalty, prompt by prompt."""
    model, processor = load(checkpoint)
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.do_sample
    lm = build_trainable(model, processor, Stage1Config(k_latent=0))
    res = evaluate(lm, processor, records[:4], batch_size=4, max_new_tokens=6, progress=False)
    d = res.settings["decoding"]
    assert d["strategy"] == "greedy" and d["repetition_penalty"] == 1.05 and "do_sample=True" in d["notice"]
    assert res.settings["prompt"]["max_pixels"] == 1280 * 28 * 28
    ids = policy_tokens(processor)
    for rec, pred in zip(records[:4], res.predictions):
        b = collate([rec], processor, k_latent=0, with_answer=False, latent_token_ids=ids.latent)
        with torch.no_grad():
            out = model.generate(**b.model_inputs(), max_new_tokens=6, do_sample=False, repetition_penalty=1.05,
                                 eos_token_id=ids.stop, pad_token_id=ids.pad)
        new = out[0, b.input_ids.shape[1]:].tolist()
        new = new[:new.index(ids.stop)] if ids.stop in new else new
        assert pred["prediction"] == processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    plain = evaluate(lm, processor, records[:4], batch_size=4, max_new_tokens=6, progress=False, repetition_penalty=1.0)
    assert plain.settings["decoding"]["repetition_penalty"] == 1.0
    assert "overrides generation_config's 1.05" in plain.settings["decoding"]["notice"]


def test_a_named_question_template_writes_the_toolkits_phrasing(checkpoint, records):
    _, processor = load(checkpoint)
    b = collate(records[1:2], processor, k_latent=0, with_answer=False,
                latent_token_ids=policy_tokens(processor).latent,
                prompt=PromptSettings(question_template="medevalkit_multiple_choice"))
    text = processor.tokenizer.decode(b.input_ids[0])
    assert "Options: \nA. left\nB. right\nAnswer with the option's letter from the given choices directly." in text
