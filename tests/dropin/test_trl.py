"""The TRL rollout_func returns trl's contract (num_generations completions per prompt,
prompt/completion ids and log-probs) from the engine, with the latents as extra fields."""
from __future__ import annotations

import types

import pytest
import torch

import engine_models as tm
from medlvr.dropin import LatentSpec, generate
from medlvr.dropin.trl import rollout_func

tokenizers = pytest.importorskip("tokenizers")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(tm.VOCAB) if i not in (0, 2, 7, 8)}
    vocab.update({"<s>": 7, "</s>": 8, "<pad>": 0, "<eos>": 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def test_rollout_contract():
    model, tok = tm.gpt2().train(), _tokenizer()  # training: num_generations per prompt
    spec = LatentSpec(name="t", start_token="<s>", end_token="</s>", exit="fixed", max_steps=2)
    trainer = types.SimpleNamespace(model=model, num_generations=2, num_generations_eval=1)
    out = rollout_func(spec, tokenizer=tok, max_new_tokens=3, temperature=0.0)(["w11 w12 w13", "w20 w21"], trainer)
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == 4
    assert out["prompt_ids"][0] == [11, 12, 13, 7] and out["prompt_ids"][2] == [20, 21, 7]
    assert [len(c) for c in out["completion_ids"]] == [len(l) for l in out["logprobs"]]
    assert out["num_latent"] == [2, 2, 2, 2] and out["latents"][0].shape == (2, 64)
    ref = generate(model, {"input_ids": torch.tensor([[11, 12, 13, 7]])}, spec, tokenizer=tok, max_new_tokens=3)
    n = int(ref.text_lengths[0])
    assert out["completion_ids"][0] == ref.tokens[0, :n].tolist()
    assert torch.allclose(out["latents"][0], ref.latents[0])
