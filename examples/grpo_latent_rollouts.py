"""GRPO with trl, completions sampled by medlvr's latent engine (docs/dropin.md).

    python examples/grpo_latent_rollouts.py --model path/to/coconut-gpt2 --preset coconut

Needs `pip install medlvr[trl]` and a local checkpoint whose tokenizer holds the preset's
tokens. The reward here is a placeholder (shorter answers score higher): replace it.
Note (medlvr/dropin/trl.py): GRPOTrainer's loss does not feed the latents back; training
through the latent segment is medlvr's VLPO.
"""
import argparse

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from medlvr.dropin.trl import rollout_func


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--preset", default="coconut")
    ap.add_argument("--out", default="grpo-latent")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(a.model)
    prompts = Dataset.from_dict({"prompt": ["2 + 3 = ?", "7 * 6 = ?"] * 8})
    trainer = GRPOTrainer(
        model=model, processing_class=tok, train_dataset=prompts,
        reward_funcs=lambda completions, **kw: [-float(len(c)) for c in completions],
        args=GRPOConfig(output_dir=a.out, num_generations=4, per_device_train_batch_size=4, max_steps=2),
        rollout_func=rollout_func(a.preset, tokenizer=tok, max_new_tokens=32))
    trainer.train()


if __name__ == "__main__":
    main()
