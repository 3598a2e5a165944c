"""The one contact with peft: LoRA on the policy, what a peft model is, whether its adapter is
still the identity, and the adapter's files for tools outside medlvr."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["add_lora", "is_peft", "peft_model", "adapter_is_identity", "save_adapter"]


def add_lora(model: nn.Module, *, r: int, alpha: int, dropout: float, target_modules: str,
             trainable_tokens: list[int]) -> nn.Module:
    """peft's LoRA on ``target_modules`` (the family's pattern, medlvr/models/qwen_vl.py) plus
    the embedding rows of ``trainable_tokens``: the new latent tokens start from random rows,
    so those rows (and only those) train."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     trainable_token_indices={"embed_tokens": list(trainable_tokens)})
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    m = model
    while hasattr(m, "module") and not hasattr(m, "disable_adapter"):
        m = m.module
    return hasattr(m, "disable_adapter") and hasattr(m, "get_base_model")


def peft_model(model: nn.Module) -> nn.Module:
    """The peft model inside DDP-style ``.module`` wrappers."""
    m = model
    while not hasattr(m, "disable_adapter"):
        m = m.module
    return m


def adapter_is_identity(model: nn.Module) -> bool:
    """True when a peft LoRA model's adapter is still at peft's identity init (every lora_B
    zero, trainable-token rows equal to the base rows): disabling it then gives the very same
    policy, so it is a valid KL reference. False for any adapter that has been trained, any
    other peft type, or a plain model."""
    if not is_peft(model):
        return False
    m = peft_model(model)
    types = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in getattr(m, "peft_config", {}).values()}
    if not types or not types <= {"LORA"}:
        return False
    for mod in m.modules():
        for name in ("lora_B", "lora_embedding_B"):
            d = getattr(mod, name, None)
            if isinstance(d, (nn.ModuleDict, nn.ParameterDict)):
                for v in d.values():
                    w = v.weight if isinstance(v, nn.Module) else v
                    if bool((w != 0).any()):
                        return False
        delta = getattr(mod, "trainable_tokens_delta", None)
        if isinstance(delta, nn.ParameterDict) and len(delta):
            base = mod.get_base_layer().weight.detach()
            for k, v in delta.items():
                idx = torch.as_tensor(mod.token_indices[k], device=base.device)
                if not torch.equal(v.detach(), base[idx].to(v.dtype)):
                    return False
    return True


def save_adapter(model: Any, state: dict[str, torch.Tensor], path: Path) -> None:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors with the trainable
    latent-token rows) from the full tensors ``state`` of the peft ``model``:
    ``PeftModel.from_pretrained(base, path)`` reads it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model.peft_config["default"].save_pretrained(str(path))
    save_file(get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False),
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
