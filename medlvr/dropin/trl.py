"""A ``rollout_func`` for ``trl.GRPOTrainer`` (trl 1.16, experimental there): completions
sampled by the latent engine.

    trainer = GRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...),
                          rollout_func=medlvr.dropin.trl.rollout_func("coconut", tokenizer=tok))

What trl 1.16 does with it (trl/trainer/grpo_trainer.py): ``_generate`` calls
``rollout_func(prompts, trainer)`` with the process's slice of the batch, in which trl's
RepeatSampler has already repeated each prompt ``num_generations`` times (its docstring
says otherwise; the code hands over ``[x["prompt"] for x in inputs]``, and the reward step
then expects one completion per input). So the function returns exactly one completion per
prompt it receives, in order: ``prompt_ids``, ``completion_ids`` and ``logprobs`` (lists of
ints / floats per completion; trl pads them itself). Every other key is an extra field that
trl copies into the reward functions' kwargs one entry per completion (``inputs[i][key] =
values[i]``): here ``latents`` (each (n, D) tensor on the CPU) and ``num_latent``.

Limit: GRPOTrainer's loss recomputes the policy's log-probs with a plain forward over
prompt + completion ids; it does not feed the latents, so its ratio is not the one of the
sampled rollout. Training through the latent segment is medlvr's VLPO (docs/vlpo.md).
"""
from __future__ import annotations

from typing import Callable

import torch

from medlvr.dropin.run import generate
from medlvr.dropin.spec import LatentSpec


def rollout_func(spec: LatentSpec | str, *, tokenizer, max_new_tokens: int = 128, temperature: float | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> Callable:
    """spec: a LatentSpec or preset name; prompts without the start token get it appended.
    tokenizer: renders chat prompts (apply_chat_template) and tokenizes them (left padding).
    temperature / top_p: None takes the trainer's (GRPOConfig.temperature / top_p)."""
    base = LatentSpec.preset(spec) if isinstance(spec, str) else spec
    spec = base.replace(require_start=False)

    def rollout(prompts: list, trainer) -> dict:
        texts = [p if isinstance(p, str) else
                 tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(trainer.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        temp = trainer.temperature if temperature is None else temperature
        nucleus = trainer.top_p if top_p is None else top_p
        out = generate(trainer.model, enc, spec, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                       temperature=temp, top_p=nucleus, generator=generator)
        lengths, steps = out.text_lengths.tolist(), out.num_latent.tolist()
        rows = range(len(texts))
        return {"prompt_ids": [out.prompt_ids[b][out.prompt_mask[b].bool()].tolist() for b in rows],
                "completion_ids": [out.tokens[b, :lengths[b]].tolist() for b in rows],
                "logprobs": [out.token_logprobs[b, :lengths[b]].tolist() for b in rows],
                "latents": [out.latents[b, :steps[b]].cpu() for b in rows],
                "num_latent": steps}

    return rollout
