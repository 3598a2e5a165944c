"""``medlvr sft``: stage 1 from the command line (medlvr/train/sft/ is the method)."""
from __future__ import annotations

import argparse

import torch

from medlvr.flags import add_config_arguments, config_from_args
from medlvr.train.sft import Stage1Config, train_stage1

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from medlvr.train.loop import add_loop_arguments

    p.add_argument("--data", required=True, help="training JSONL (medlvr format)")
    p.add_argument("--model", default="default", help="'default' (embedded small Qwen2.5-VL) or a local checkpoint dir")
    add_config_arguments(p, Stage1Config)
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad records instead of failing")
    p.add_argument("--split", default="train", help="records of this split are used (others ignored)")
    add_loop_arguments(p)


def train(args: argparse.Namespace) -> dict:
    """Load the model and data the flags name and train; the last metrics row plus final_dir."""
    from medlvr.cli import prompt_from_args
    from medlvr.data.records import load_split
    from medlvr.models import load
    from medlvr.policy import build_trainable
    from medlvr.train.loop import LoopConfig

    records = load_split(args.data, args.split, skip_bad=args.skip_bad, window=getattr(args, "window", None))
    cfg = config_from_args(Stage1Config, args)
    lcfg = config_from_args(LoopConfig, args)
    prompt = prompt_from_args(args)
    model, processor = load(args.model, dtype=torch.float32, seed=lcfg.seed, min_pixels=prompt.min_pixels,
                            max_pixels=prompt.max_pixels)
    # The new weights (LoRA A, the projector) from --seed too: a rerun, and every process of a
    # sharded run (medlvr/policy/fsdp.py checks they agree), starts from the same init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lcfg.seed)
        lm = build_trainable(model, processor, cfg, prompt=prompt)
    print(f"prompt: {lm.prompt.describe()}")
    return train_stage1(lm, processor, records, lcfg, base=args.model, desc=f"sft K={cfg.k_latent} {cfg.mode}")


def run(args: argparse.Namespace) -> int:
    from medlvr.train.sft import LOSS_TERMS

    res = train(args)
    shown = ", ".join(f"{k} {res[k]:.4f}" for k in ("loss", "ce", *LOSS_TERMS) if k in res)
    print(f"final weights: {res['final_dir']}  ({shown})")
    return 0
