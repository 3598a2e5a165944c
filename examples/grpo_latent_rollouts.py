"""GRPO with trl, completions sampled by medlvr's latent engine (docs/dropin.md).

    python examples/grpo_latent_rollouts.py --model path/to/coconut-gpt2 --preset coconut

Needs trl (`pip install medlvr[trl]`) and a local checkpoint whose tokenizer holds the
preset's tokens. Runs on a GPU (bf16) or, without one, on the CPU (fp32). Coconut's prompts
carry their latent placeholders (``--latents`` of them); the other presets' prompts get
the start token appended. The reward here is a placeholder (more distinct words score
higher): replace it. Note (medlvr/dropin/trl.py): GRPOTrainer's loss does not feed the
latents back; training through the latent segment is medlvr's VLPO.
"""
import argparse

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from medlvr.dropin import LatentSpec
from medlvr.dropin.trl import rollout_func

QUESTIONS = ["2 + 3 = ?", "7 * 6 = ?"]


def prompts(preset: str, latents: int) -> list[str]:
    spec = LatentSpec.preset(preset)
    if spec.placement != "placeholders":
        return list(QUESTIONS)
    return [f"{q} {spec.start_token}{spec.latent_token * latents}{spec.end_token}" for q in QUESTIONS]


def distinct_words(completions, **kwargs):
    return [float(len(set(c.split()))) for c in completions]


def make_trainer(model, tokenizer, *, preset: str, out: str, max_steps: int = 2, latents: int = 2,
                 max_new_tokens: int = 32, reward=distinct_words) -> GRPOTrainer:
    cuda = torch.cuda.is_available()
    args = GRPOConfig(output_dir=out, num_generations=4, per_device_train_batch_size=4, max_steps=max_steps,
                      max_completion_length=max_new_tokens, use_cpu=not cuda,
                      bf16=cuda and torch.cuda.is_bf16_supported(), report_to="none", save_strategy="no")
    data = Dataset.from_dict({"prompt": prompts(preset, latents) * 8})
    return GRPOTrainer(model=model, processing_class=tokenizer, train_dataset=data, reward_funcs=reward, args=args,
                       rollout_func=rollout_func(preset, tokenizer=tokenizer, max_new_tokens=max_new_tokens))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--preset", default="coconut")
    ap.add_argument("--out", default="grpo-latent")
    ap.add_argument("--max-steps", type=int, default=2)
    a = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(a.model)
    make_trainer(model, tok, preset=a.preset, out=a.out, max_steps=a.max_steps).train()


if __name__ == "__main__":
    main()
