"""``medlvr plan``: per-GPU memory of both stages (medlvr/train/plan.py is the arithmetic)."""
from __future__ import annotations

import argparse
import json

from medlvr.train.plan import PRESETS, REFERENCES, PlanArgs, format_table, load_config, plan

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-vl-7b",
                   help=f"a preset ({', '.join(PRESETS)}), 'default', a checkpoint dir or a config.json")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run (FSDP shards over all of them; default 8)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sample, image tokens included (default 1024)")
    p.add_argument("--image-tokens", type=int, default=256, help="merged vision tokens per sample (default 256)")
    p.add_argument("--k-latent", type=int, default=8, help="latent steps K (default 8)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per GPU per micro-batch (default 1)")
    p.add_argument("--rollouts", type=int, default=8, help="VLPO rollouts per prompt (the group size; default 8)")
    p.add_argument("--groups", type=int, default=2, help="VLPO prompts (groups) per GPU per rollout phase (default 2)")
    p.add_argument("--max-new", type=int, default=256, help="VLPO answer tokens per rollout (default 256)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA modes (default 16)")
    p.add_argument("--projector", action="store_true", help="count the latent projector (--projector of sft)")
    p.add_argument("--reference", choices=REFERENCES, default="copy",
                   help="VLPO's reference policy: copy = a frozen copy of the model (what medlvr vlpo makes today), "
                        "adapter = the stage-1 LoRA kept as a frozen second adapter (LoRA modes), none = kl_beta 0")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (bytes) instead of a table (GiB)")


def run(args: argparse.Namespace) -> int:
    for name in ("gpus", "seq_len", "micro_batch", "rollouts", "groups", "lora_r"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    for name in ("image_tokens", "k_latent", "max_new"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    if args.gpu_mem <= 0:
        raise ValueError(f"--gpu-mem: expected GiB > 0, got {args.gpu_mem}")
    a = PlanArgs(gpus=args.gpus, gpu_mem=args.gpu_mem, seq_len=args.seq_len, image_tokens=args.image_tokens,
                 k_latent=args.k_latent, micro_batch=args.micro_batch, rollouts=args.rollouts, groups=args.groups,
                 max_new=args.max_new, lora_r=args.lora_r, projector=args.projector, reference=args.reference)
    rows = plan(load_config(args.model), a)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"per-GPU memory (GiB) of {args.model} on {a.gpus} GPUs of {a.gpu_mem:g} GiB; "
              f"micro-batch {a.micro_batch} "
              f"x {a.seq_len} tokens, K={a.k_latent}; VLPO {a.groups} groups x {a.rollouts} rollouts per GPU")
        print(format_table(rows, a.gpu_mem))
    return 0

