"""The run folder: how stage 1 (``medlvr sft``), stage 2 (``medlvr vlpo``) and the demo save a
trained model, how evaluation and ``--init`` load it, and how a run resumes.

A run folder (a finished run's ``final/`` or a checkpoint ``checkpoints/step-XXXXXXX/``):

    run.json            what to rebuild before loading the weights:
                        {"base": model name or dir, "stage1": Stage1Config fields, ...}
                        plus what the stage adds ("loop": LoopConfig, "vlpo": VLPOConfig with
                        its LoopConfig under "loop", "init")
    model.safetensors   the trainable parameters of the stage-1 LatentLM (LoRA or all)
    hf/                 (a finished run's final/) the same weights for transformers / peft:
                        a peft adapter folder (LoRA) or a transformers model folder (full)

A checkpoint adds what resuming needs:

    optimizer.pt, scheduler.pt   optimizer / scheduler state
    rng-<rank>.pt                python / numpy / torch (/ cuda) RNG states of each process
    state.json                   step, data position, seed, number of processes

Every folder is written to a ``.tmp-`` sibling first and moved with os.replace, so a crash
never leaves a half-written one; ``checkpoints/latest`` names the newest checkpoint and is
replaced atomically too.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlvr.policy.fsdp import full_optimizer_state, gather_trainable, is_sharded, load_full, load_full_optimizer_state

CKPT_DIR = "checkpoints"
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
            state = module.trainable_state_dict()
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


def write_hf(lm: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """The run's weights in the formats of transformers and peft, in ``path`` (``hf/`` of a
    final run folder), from the full tensors ``state`` (what model.safetensors holds, so a
    sharded run writes the same files):

    - LoRA: a peft adapter folder (adapter_config.json, adapter_model.safetensors, with the
      trainable latent-token rows): ``PeftModel.from_pretrained(base, path)``;
    - full fine-tuning: a transformers model folder: ``AutoModelForImageTextToText.from_pretrained(path)``
      (Qwen2_5_VLForConditionalGeneration).

    The latent projector is medlvr's own module: it stays in model.safetensors only."""
    from safetensors.torch import save_file

    inner = lm.model
    sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    path.mkdir(parents=True)
    if hasattr(inner, "peft_config"):
        from peft import get_peft_model_state_dict

        inner.peft_config["default"].save_pretrained(str(path))
        save_file(get_peft_model_state_dict(inner, state_dict=sd, save_embedding_layers=False),
                  str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        from medlvr.models.hf import save_pretrained

        save_pretrained(inner, str(path), state_dict=sd)


# ----------------------------------------------------------------------------- resume


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, lm, optimizer, scheduler, *, out_dir: Path, step: int, position: dict,
                    seed: int, meta: dict, keep: int) -> RunDir:
    """Checkpoint ``step`` (a run folder plus the resume state; every process contributes its
    RNG state). position: the objective's data position (stage 1: epoch, micro-batch)."""
    root = Path(out_dir) / CKPT_DIR
    ckpt = RunDir(root / f"step-{step:07d}")
    # Each rank drops its RNG state into a side folder first; the main process moves them into
    # the checkpoint while it writes the rest (RunDir.save waits for every rank before that).
    rngs = root / f".rng-{ckpt.path.name}"
    if accelerator.is_main_process:
        if rngs.exists():
            shutil.rmtree(rngs)
        rngs.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), rngs / f"rng-{accelerator.process_index}.pt")

    def _moved_rngs(dest: Path) -> None:  # called inside RunDir.save on the main process
        for f in rngs.iterdir():
            os.replace(f, dest.parent / f.name)
        rngs.rmdir()

    state = {"step": step, **position, "seed": seed, "num_processes": accelerator.num_processes}
    module = accelerator.unwrap_model(lm)
    sharded = is_sharded(module)
    if sharded:  # one full state keyed by parameter name (collective: every rank gathers)
        state["optimizer"] = "full"
        opt_state = full_optimizer_state(module, optimizer)
    else:
        opt_state = optimizer.state_dict()
    ckpt.save(lm, meta, accelerator=accelerator, extra_files={
        "optimizer.pt": lambda p: torch.save(opt_state, p),
        "scheduler.pt": lambda p: torch.save(scheduler.state_dict(), p),
        "state.json": lambda p: p.write_text(json.dumps(state)),
        "rng": _moved_rngs,
    })
    if accelerator.is_main_process:
        _write_atomic(root / "latest", ckpt.path.name)
        old = sorted(p for p in root.glob("step-*") if p.is_dir())
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


def find_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """``auto``: the checkpoint named by <out>/checkpoints/latest (None when there is none)."""
    if resume == "auto":
        latest = Path(out_dir) / CKPT_DIR / "latest"
        if not latest.is_file():
            return None
        return Path(out_dir) / CKPT_DIR / latest.read_text().strip()
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"resume: expected a checkpoint directory with state.json, got {resume}")
    return p


def load_checkpoint(accelerator, lm, optimizer, scheduler, ckpt: Path) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; returns state.json."""
    state = json.loads((Path(ckpt) / "state.json").read_text())
    if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        # Weights and optimizer are process-count independent; only the RNG streams are per process.
        accelerator.print(f"resume: checkpoint written by {state['num_processes']} processes, running "
                          f"{accelerator.num_processes}: RNG streams are not restored exactly")
    module = accelerator.unwrap_model(lm)
    if (state.get("optimizer") == "full") != is_sharded(module):
        raise ValueError(f"resume: {ckpt} was written by a {'sharded' if state.get('optimizer') else 'unsharded'} "
                         "run; resume it with the same --fsdp setting")
    RunDir(Path(ckpt)).load_weights(module, strict_trainable=True)
    opt_state = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
    if is_sharded(module):
        load_full_optimizer_state(module, optimizer, opt_state)
    else:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(torch.load(Path(ckpt) / "scheduler.pt", weights_only=False))
    rng = Path(ckpt) / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state
