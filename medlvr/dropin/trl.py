"""A ``rollout_func`` for ``trl.GRPOTrainer`` (trl >= 1.x, experimental there): completions
sampled by the latent engine.

    trainer = GRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...),
                          rollout_func=medlvr.dropin.trl.rollout_func("coconut", tokenizer=tok))

trl's contract (trl/trainer/grpo_trainer.py, RolloutFunc): ``f(prompts, trainer)`` gets the
process's prompts once each and returns ``prompt_ids``, ``completion_ids``, ``logprobs``
(lists per completion, ``num_generations`` completions per prompt, in order); other keys
reach the reward functions: here ``latents`` (each (n, D) tensor) and ``num_latent``.

Limit: GRPOTrainer's loss recomputes the policy's log-probs with a plain forward over
prompt + completion ids; it does not feed the latents, so its ratio is not the one of the
sampled rollout. Training through the latent segment is medlvr's VLPO (docs/vlpo.md).
"""
from __future__ import annotations

from typing import Callable

import torch

from medlvr.dropin.run import generate
from medlvr.dropin.spec import LatentSpec


def rollout_func(spec: LatentSpec | str, *, tokenizer, max_new_tokens: int = 128, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Callable:
    """spec: a LatentSpec or preset name; prompts without the start token get it appended.
    tokenizer: renders chat prompts (apply_chat_template) and tokenizes them (left padding)."""
    base = LatentSpec.preset(spec) if isinstance(spec, str) else spec
    spec = base.replace(require_start=False)

    def rollout(prompts: list, trainer) -> dict:
        n = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        texts = [p if isinstance(p, str) else
                 tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        texts = [t for t in texts for _ in range(n)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(trainer.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        out = generate(trainer.model, enc, spec, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, generator=generator)
        lengths, steps = out.text_lengths.tolist(), out.num_latent.tolist()
        prompt_ids = [out.prompt_ids[b][out.prompt_mask[b].bool()].tolist() for b in range(len(texts))]
        return {"prompt_ids": prompt_ids,
                "completion_ids": [out.tokens[b, :lengths[b]].tolist() for b in range(len(texts))],
                "logprobs": [out.token_logprobs[b, :lengths[b]].tolist() for b in range(len(texts))],
                "latents": [out.latents[b, :steps[b]].cpu() for b in range(len(texts))],
                "num_latent": steps}

    return rollout
