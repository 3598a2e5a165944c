"""The run folder: the one type in which both stages (``medlvr sft``, ``medlvr vlpo``) and the
demo save a trained policy, and from which evaluation and ``--init`` load it
(:func:`medlvr.policy.load_trained`).

A run folder (a finished run's ``final/``, or a checkpoint of medlvr/train/checkpoints.py):

    run.json            what to rebuild before loading the weights:
                        {"base": model name or dir, "stage1": Stage1Config fields, ...}
                        plus what the stage adds ("loop": LoopConfig, "vlpo": VLPOConfig with
                        its LoopConfig under "loop", "init")
    model.safetensors   the trainable parameters of the LatentLM (LoRA or all, the projector)
    hf/                 (a finished run's final/) the same weights for transformers / peft:
                        a peft adapter folder (LoRA) or a transformers model folder (full)

Every folder is written to a ``.tmp-`` sibling first and moved with os.replace, so a crash
never leaves a half-written one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medlvr.policy.fsdp import gather_trainable, is_sharded, load_full
from medlvr.policy.lora import is_peft, save_adapter

META = "run.json"
WEIGHTS = "model.safetensors"
HF_DIR = "hf"


def run_meta(*, base: str, stage1: Any, **extra: Any) -> dict:
    """The content of run.json: the base model, the stage-1 config (a Stage1Config or its
    dict) and whatever the stage adds (``loop=``, ``vlpo=``, ``init=``)."""
    s1 = asdict(stage1) if hasattr(stage1, "__dataclass_fields__") else dict(stage1)
    return {"base": base, "stage1": s1, **extra}


def save_run_config(path: str | Path, *, base: str, cfg: Any, extra: dict | None = None) -> None:
    """run.json alone (beside weights written elsewhere)."""
    Path(path).write_text(json.dumps(run_meta(base=base, stage1=cfg, **(extra or {})), indent=2))


@dataclass(frozen=True)
class RunDir:
    """One run folder (see the module docstring)."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def meta(self) -> dict:
        p = self.path / META
        if not p.is_file():
            raise FileNotFoundError(f"run_dir: expected {p} (written by medlvr sft / vlpo), not found")
        return json.loads(p.read_text())

    def save(self, lm: torch.nn.Module, meta: dict, *, accelerator: Any = None,
             extra_files: dict[str, Any] | None = None, export_hf: bool = False) -> "RunDir":
        """Write ``lm``'s trainable weights and ``meta`` atomically (all processes call this under
        accelerate: the weights are gathered on every rank, the main process writes).
        extra_files: name -> callable(path) that writes one more file into the folder (checkpoints).
        export_hf: also write ``hf/`` for tools outside medlvr (:func:`write_hf`)."""
        from safetensors.torch import save_file

        main = accelerator is None or accelerator.is_main_process
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        if accelerator is not None:
            accelerator.wait_for_everyone()
        module = accelerator.unwrap_model(lm) if accelerator is not None else lm
        if is_sharded(module):  # FSDP: gathered to full tensors, the same file as unsharded runs write
            state = gather_trainable(module, {n for n, p in module.named_parameters() if p.requires_grad})
        else:
            state = trainable_state(module)
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_file(state, str(tmp / WEIGHTS))
            (tmp / META).write_text(json.dumps(meta, indent=2))
            if export_hf:
                write_hf(module, state, tmp / HF_DIR)
            for name, write in (extra_files or {}).items():
                write(tmp / name)
            if self.path.exists():  # a re-run (or a re-run of a step after a resume): replace it
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return self

    def load_weights(self, module: torch.nn.Module, *, strict_trainable: bool = False) -> None:
        """Load model.safetensors into ``module`` (a LatentLM). Unexpected keys are an error;
        with ``strict_trainable`` so is a trainable parameter the file lacks (resume)."""
        from safetensors.torch import load_file

        weights = load_file(str(self.path / WEIGHTS))
        names = set(module.state_dict())
        unexpected = sorted(set(weights) - names)
        if not unexpected:
            if is_sharded(module):  # full tensors in, each process keeps its shard
                load_full(module, weights)
            else:
                module.load_state_dict(weights, strict=False)
        missing = {n for n, p in module.named_parameters() if p.requires_grad} - set(weights) if strict_trainable else set()
        if unexpected or missing:
            raise ValueError(f"{self.path / WEIGHTS}: weights do not match the model (missing {sorted(missing)[:5]}, "
                             f"unexpected {unexpected[:5]})")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with requires_grad, detached CPU copies keyed by state_dict name: what
    model.safetensors holds (LoRA and the latent rows, or everything, plus the projector)."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone().contiguous() for n, t in module.state_dict().items() if n in names}


def write_hf(lm: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """The run's weights in the formats of transformers and peft, in ``path`` (``hf/`` of a
    final run folder), from the full tensors ``state`` (what model.safetensors holds, so a
    sharded run writes the same files):

    - LoRA: a peft adapter folder (adapter_config.json, adapter_model.safetensors, with the
      trainable latent-token rows): ``PeftModel.from_pretrained(base, path)``;
    - full fine-tuning: a transformers model folder: ``AutoModelForImageTextToText.from_pretrained(path)``
      (Qwen2_5_VLForConditionalGeneration).

    The latent projector is medlvr's own module: it stays in model.safetensors only."""
    inner = lm.model
    sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    path.mkdir(parents=True)
    if is_peft(inner):
        save_adapter(inner, sd, path)
    else:
        from medlvr.models.hf import save_pretrained

        save_pretrained(inner, str(path), state_dict=sd)
