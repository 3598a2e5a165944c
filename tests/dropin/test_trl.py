"""The TRL route: rollout_func returns what trl 1.16's GRPOTrainer consumes (one completion
per prompt it is handed, prompt/completion ids and log-probs, the latents as extra fields),
and examples/grpo_latent_rollouts.py trains two GRPO steps end to end on a tiny GPT-2 with
Coconut's tokens, on the CPU."""
from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch

import engine_models as tm
from medlvr.dropin import LatentSpec, generate
from medlvr.dropin.trl import rollout_func

tokenizers = pytest.importorskip("tokenizers")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_latent_rollouts.py"
SPECIAL = {"<|start-latent|>": 7, "<|end-latent|>": 8, "<|latent|>": 9}


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(tm.VOCAB) if i not in (0, 2, 7, 8, 9)}
    vocab.update({"<pad>": 0, "<eos>": 2, **SPECIAL})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def test_rollout_contract_one_completion_per_prompt():
    """trl hands the prompts already repeated num_generations times: no repeat here."""
    model, tok = tm.gpt2().train(), _tokenizer()
    spec = LatentSpec(name="t", start_token="<|start-latent|>", end_token="<|end-latent|>", exit="fixed",
                      max_steps=2)
    trainer = types.SimpleNamespace(model=model, num_generations=2, temperature=0.0, top_p=1.0)
    prompts = ["w11 w12 w13", "w11 w12 w13", "w20 w21", "w20 w21"]
    out = rollout_func(spec, tokenizer=tok, max_new_tokens=3)(prompts, trainer)
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == len(prompts)
    assert out["prompt_ids"][0] == [11, 12, 13, 7] and out["prompt_ids"][2] == [20, 21, 7]
    assert [len(c) for c in out["completion_ids"]] == [len(l) for l in out["logprobs"]]
    assert out["num_latent"] == [2, 2, 2, 2] and out["latents"][0].shape == (2, 64)
    ref = generate(model, {"input_ids": torch.tensor([[11, 12, 13, 7]])}, spec, tokenizer=tok, max_new_tokens=3)
    n = int(ref.text_lengths[0])
    assert out["completion_ids"][0] == ref.tokens[0, :n].tolist()
    assert torch.allclose(out["latents"][0], ref.latents[0])


def test_example_trains_two_grpo_steps_on_cpu(tmp_path):
    pytest.importorskip("trl", reason="trl is an optional dependency (pip install medlvr[trl])")
    pytest.importorskip("datasets", reason="trl's GRPOTrainer takes a datasets.Dataset")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tm.gpt2().save_pretrained(tmp_path / "ckpt")
    _tokenizer().save_pretrained(tmp_path / "ckpt")
    spec = importlib.util.spec_from_file_location("grpo_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    calls = []

    def reward(completions, num_latent, **kwargs):
        calls.append((len(completions), list(num_latent)))
        return example.distinct_words(completions)

    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = example.make_trainer(model, tok, preset="coconut", out=str(tmp_path / "out"), max_steps=2,
                                   max_new_tokens=8, reward=reward)
    trainer.train()
    assert trainer.state.global_step == 2
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    assert len(calls) == 2 and all(n == per_step for n, _ in calls)
    assert all(k == [2] * per_step for _, k in calls)  # Coconut: the prompt's 2 placeholders per row
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert changed, "no weight changed in two GRPO steps"
