"""``medlvr demo``: the whole method on the embedded default model, on a CPU, in minutes.

1. synthesise a deterministic medical-VQA-like set (medlvr.train.synth; ROI boxes on part of it);
2. train (a) plain SFT without a latent segment (K = 0),
         (b) stage 1: recurrent latent segment of K steps + ROI alignment loss,
         (c) stage 1 + stage 2: VLPO started from (b)'s weights, on fresh prompts (outcome
             reward only: no ROI, the answer is used only to score rollouts);
3. evaluate the three on the held-out test split (greedy, the same decoding for all), print
   the table, save the plot (accuracy.png), predictions and a JSON summary (summary.json).

Everything is seeded: the same command prints the same table on the same machine (CPU
floating point can differ between machines). (a) and (b) get the same data, steps, batch and
learning rate; (c) gets (b)'s steps plus its VLPO steps, as in the paper's recipe.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class DemoPlan:
    n_records: int = 1000          # synthesised records
    splits: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test fractions
    difficulty: str = "easy"
    roi_fraction: float = 0.5      # of the records with a lesion; partial annotation on purpose
    k_latent: int = 4
    roi_weight: float = 1.0
    sft_steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 10
    vlpo_records: int = 400        # fresh prompts for stage 2 (another seed, no ROI: outcome reward only)
    vlpo_steps: int = 60
    vlpo_prompts: int = 8
    vlpo_rollouts: int = 8
    vlpo_lr: float = 3e-5
    vlpo_sigma: float = 0.1
    vlpo_kl: float = 0.2           # chosen on the val split among 0.04 / 0.2 (see docs/training.md)
    eval_records: int | None = None  # None: the whole test split
    max_new_tokens: int = 6
    seed: int = 0
    image_format: str = "png"      # "dicom": the same images as CT-like DICOM (medlvr.train.synth)


FULL = DemoPlan()
QUICK = DemoPlan(n_records=96, sft_steps=6, batch_size=8, warmup_steps=0, vlpo_records=8, vlpo_steps=2, vlpo_prompts=2,
                 vlpo_rollouts=2, eval_records=16)


def run_demo(out_dir: str | Path, plan: DemoPlan = FULL, *, progress: bool = True,
             mixed_precision: str = "auto") -> dict:
    """Run the demo into ``out_dir``; returns the summary dict (also written to summary.json).

    Every phase runs on the GPU when there is one, under ``mixed_precision`` autocast
    ("auto": bf16 on a GPU, none on the CPU; "bf16" on a CPU runs the GPU's numerics)."""
    from medlvr.models import build_default
    from medlvr.train.data import load_jsonl
    from medlvr.train.evaluate import evaluate, print_table, write_outputs
    from medlvr.train.loop import LoopConfig, make_accelerator, resolve_mixed_precision
    from medlvr.train.runs import RunDir, load_trained
    from medlvr.train.stage1 import Stage1Config, build_trainable, train_stage1
    from medlvr.train.synth import synthesize
    from medlvr.train.vlpo import VLPOConfig, train_vlpo

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    paths = synthesize(out / "data", n=plan.n_records, seed=plan.seed, roi_fraction=plan.roi_fraction,
                       difficulty=plan.difficulty, split_fractions=plan.splits, image_format=plan.image_format)
    train, _ = load_jsonl(paths["train"])
    test, _ = load_jsonl(paths["test"])
    # Stage 2 runs on prompts stage 1 has not fitted (after several SFT epochs nearly every
    # rollout on the SFT set is right, so GRPO's group advantages are ~0 there): a fresh draw
    # of the same distribution, without ROI boxes.
    rl_paths = synthesize(out / "data_rl", n=plan.vlpo_records, seed=plan.seed + 1, roi_fraction=0.0,
                          difficulty=plan.difficulty, split_fractions=(1.0, 0.0, 0.0),
                          image_format=plan.image_format)
    rl_prompts, _ = load_jsonl(rl_paths["train"])
    if plan.eval_records is not None:
        test = test[:plan.eval_records]
    times["synth"] = time.perf_counter() - t
    print(f"data: {len(train)} train / {len(test)} test records, "
          f"{sum(bool(r.rois) for r in train)} train records with an ROI, {len(rl_prompts)} stage-2 prompts "
          f"({times['synth']:.1f}s)")

    def loop_cfg(name: str) -> LoopConfig:
        return LoopConfig(out_dir=str(out / name), max_steps=plan.sft_steps, batch_size=plan.batch_size, lr=plan.lr,
                          warmup_steps=plan.warmup_steps, seed=plan.seed, log_every=max(1, plan.sft_steps // 20),
                          progress=progress, mixed_precision=mixed_precision)

    runs = {
        "a_sft": Stage1Config(k_latent=0),
        "b_stage1": Stage1Config(k_latent=plan.k_latent, mode="recurrent", roi_weight=plan.roi_weight),
    }
    finals: dict[str, Path] = {}
    for name, s1 in runs.items():
        t = time.perf_counter()
        model, processor = build_default(seed=plan.seed)
        lm = build_trainable(model, processor, s1)
        res = train_stage1(lm, processor, train, loop_cfg(name), base="default",
                         desc=f"({name[0]}) {'plain SFT' if s1.k_latent == 0 else f'stage 1, K={s1.k_latent}'}")
        finals[name] = Path(res["final_dir"])
        times[name] = time.perf_counter() - t

    # (c): VLPO from (b)'s final weights, in place, then saved in the same run format.
    t = time.perf_counter()
    accelerator = make_accelerator(mixed_precision)
    device = accelerator.device
    lm, processor, meta = load_trained(finals["b_stage1"], device=device)
    vcfg = VLPOConfig(k_latent=plan.k_latent, steps=plan.vlpo_steps, batch_prompts=plan.vlpo_prompts,
                      n_rollouts=plan.vlpo_rollouts, lr=plan.vlpo_lr, latent_sigma=plan.vlpo_sigma, kl_beta=plan.vlpo_kl,
                      max_new_tokens=plan.max_new_tokens, seed=plan.seed)
    (out / "c_vlpo").mkdir(parents=True, exist_ok=True)
    metrics = out / "c_vlpo" / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    lm.train()
    train_vlpo(lm.model, processor, rl_prompts, vcfg, progress=progress, log_path=metrics, projector=lm.projector,
               accelerator=accelerator)
    run = RunDir(out / "c_vlpo" / "final").save(lm, {**meta, "vlpo": asdict(vcfg), "init": str(finals["b_stage1"])},
                                               accelerator=accelerator)
    finals["c_vlpo"] = run.path
    times["c_vlpo"] = time.perf_counter() - t

    labels = {"a_sft": "(a) SFT", "b_stage1": "(b) stage 1", "c_vlpo": "(c) stage 1+2"}
    results = {}
    t = time.perf_counter()
    for name, path in finals.items():
        lm, processor, _ = load_trained(path, device=device)
        results[labels[name]] = evaluate(lm, processor, test, max_new_tokens=plan.max_new_tokens, progress=progress,
                                         mixed_precision=mixed_precision)
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all

    title = f"medlvr demo: held-out synthetic test ({len(test)} records)"
    text = print_table(results, title=title)
    files = write_outputs(results, out, title=title)
    accs = {n: r.overall for n, r in results.items()}
    a, b, c = (accs[labels[k]] for k in ("a_sft", "b_stage1", "c_vlpo"))
    ordering = "c > b > a (the paper's ordering)" if c > b > a else (
        f"NOT the paper's ordering: a={a:.3f}, b={b:.3f}, c={c:.3f}")
    summary = {"plan": asdict(plan), "device": str(device), "mixed_precision": resolve_mixed_precision(mixed_precision),
               "accuracy": accs,
               "by_qtype": {n: {q: v[0] for q, v in r.by_qtype.items()} for n, r in results.items()},
               "ordering": ordering, "seconds": times, "threads": torch.get_num_threads(),
               "files": {k: str(v) for k, v in files.items()}, "table": text}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"ordering: {ordering}")
    print(f"wall time {times['total']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in times.items() if k != 'total')}); "
          f"plot {files['plot']}, summary {out / 'summary.json'}")
    return summary


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from medlvr.train.loop import MIXED_PRECISION

    p.add_argument("--quick", action="store_true", help="a smoke-test sized run (well under a minute)")
    p.add_argument("--out", default="demo_out", help="output directory (data, runs, plot, summary.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto",
                   help="autocast for every phase: auto = bf16 on a GPU, none on the CPU")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--format", choices=("png", "dicom"), default="png", dest="image_format",
                   help="synthetic images as PNG (default) or CT-like DICOM (the same pixels after windowing)")


def demo_main(args: argparse.Namespace) -> int:
    plan = replace(QUICK if args.quick else FULL, seed=args.seed, image_format=getattr(args, "image_format", "png"))
    run_demo(args.out, plan, progress=not args.no_progress, mixed_precision=args.mixed_precision)
    return 0
