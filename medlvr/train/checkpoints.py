"""Checkpoints and exact resume of the shared loop (medlvr/train/loop.py).

A checkpoint ``<out>/checkpoints/step-XXXXXXX/`` is a run folder (medlvr/policy/run_dir.py:
run.json + model.safetensors) plus what resuming needs:

    optimizer.pt, scheduler.pt   optimizer / scheduler state
    rng-<rank>.pt                python / numpy / torch (/ cuda) RNG states of each process
    state.json                   step, data position, seed, number of processes

``checkpoints/latest`` names the newest checkpoint and is replaced atomically.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from medlvr.policy.fsdp import full_optimizer_state, is_sharded, load_full_optimizer_state
from medlvr.policy.run_dir import RunDir

CKPT_DIR = "checkpoints"


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
