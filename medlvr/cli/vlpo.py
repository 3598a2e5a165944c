"""``medlvr vlpo``: stage 2 from the command line (medlvr/train/vlpo/objective.py is the method)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from medlvr.flags import add_config_arguments, config_from_args
from medlvr.train.vlpo import VLPOConfig, train_vlpo

__all__ = ["add_arguments", "train", "run"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``medlvr vlpo``: one per VLPOConfig field and per loop setting it exposes
    (vlpo_step.VLPO_LOOP_FLAGS: --out, --steps, --lr, --seed, --device, ...), plus model and data."""
    d = VLPOConfig()
    p.add_argument("--data", required=True, help="training JSONL (medlvr format)")
    p.add_argument("--split", default="train", help="records of this split are used (others ignored)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad records instead of failing")
    p.add_argument("--model", default="default",
                   help="'default' (embedded small Qwen2.5-VL) or a local checkpoint dir; ignored with --init")
    p.add_argument("--init", default=None,
                   help="a stage-1 run directory (run.json + model.safetensors, e.g. runs/sft/final): "
                        "its base model, LoRA, projector and K are restored and trained further")
    p.add_argument("--lora", action="store_true", help="without --init: LoRA (q/k/v/o) instead of full fine-tuning")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank, with --lora (default 16)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (scale alpha/r), with --lora (default 32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g = p.add_argument_group("VLPO")
    g.add_argument("--k-latent", type=int, default=None,
                   help=f"latent steps K (default: the --init run's K, else {d.k_latent})")
    add_config_arguments(g, VLPOConfig, skip=("k_latent", "loop"), show_default=True)
    own = [f.name for f in dataclasses.fields(VLPOConfig) if f.name != "loop"]
    add_config_arguments(p.add_argument_group("training loop"), VLPOConfig, skip=own, show_default=True)
    return p


def train(args: argparse.Namespace) -> dict:
    """``medlvr vlpo``: load (model from --model or the stage-1 run --init), data, train, save.

    Output (<out>): metrics.jsonl (one line per step), vlpo.json (the config: VLPOConfig's
    fields, the loop's settings nested under "loop"), final/
    (a run folder, medlvr/policy/run_dir.py, so ``stage1.load_trained`` and the
    evaluation read a VLPO result like a stage-1 one). Returns the last step's metrics plus
    ``final_dir``.
    """
    from pathlib import Path

    from medlvr.cli import prompt_from_args
    from medlvr.data.records import load_split
    from medlvr.models import load
    from medlvr.devices import trains_on_gpu
    from medlvr.policy import RunDir, build_trainable, load_trained, run_meta
    from medlvr.train.loop import make_accelerator
    from medlvr.train.sft import Stage1Config

    cfg = config_from_args(VLPOConfig, args, k_latent=VLPOConfig().k_latent)  # K is set below; checked when made
    device = torch.device("cuda" if trains_on_gpu(cfg.loop.device) else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    records = load_split(args.data, args.split, skip_bad=args.skip_bad, window=getattr(args, "window", None))

    prompt = prompt_from_args(args)
    if args.init:  # the stage-1 run's prompt settings, where a flag does not set one
        lm, processor, meta = load_trained(args.init, device=device, dtype=dtype, prompt=prompt)
        base = meta["base"]
        k_default = int(meta["stage1"]["k_latent"])
        stage1 = meta["stage1"]
    else:
        model, processor = load(args.model, dtype=dtype, device=device, seed=cfg.loop.seed,
                                min_pixels=prompt.min_pixels, max_pixels=prompt.max_pixels)
        k_default = VLPOConfig().k_latent if args.k_latent is None else args.k_latent
        s1 = Stage1Config(k_latent=k_default, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha)
        with torch.random.fork_rng(devices=[]):  # the new LoRA weights from --seed: reruns agree
            torch.manual_seed(cfg.loop.seed)
            lm = build_trainable(model, processor, s1, prompt=prompt).to(device)
        base, stage1 = args.model, dataclasses.asdict(s1)
    cfg = dataclasses.replace(cfg, k_latent=k_default if args.k_latent is None else args.k_latent)  # re-checked
    print(f"prompt: {lm.prompt.describe()}")

    out = Path(cfg.loop.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vlpo.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()  # one run per directory: metrics of an older run are not mixed in
    # "auto": a stage-1 LoRA already holds the SFT policy (disabling it would give the base
    # model), so the KL reference is then a frozen copy; a fresh adapter is simply disabled.
    accelerator = make_accelerator(cfg.loop.mixed_precision, device=device.type)
    history = train_vlpo(lm, processor, records, cfg, log_path=metrics_path, reference="auto",
                         accelerator=accelerator)
    stage1 = {**stage1, "k_latent": cfg.k_latent}
    RunDir(out / "final").save(lm, run_meta(base=base, stage1=stage1, vlpo=dataclasses.asdict(cfg), init=args.init,
                                            prompt=lm.prompt.to_meta()), accelerator=accelerator)
    last = dict(history[-1]) if history else {}
    last["final_dir"] = str(out / "final")
    return last


def run(args: argparse.Namespace) -> int:
    res = train(args)
    print(f"final weights: {res['final_dir']}")
    return 0
