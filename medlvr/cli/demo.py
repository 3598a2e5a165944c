"""``medlvr demo``: the whole method on the embedded default model, on a CPU, in minutes.

1. synthesise a deterministic medical-VQA-like set (medlvr.data.synth; ROI boxes on part of
   it) with a held-out test split of >= 1,000 records, and a fresh draw of stage-2 prompts;
2. train (a) plain SFT without a latent segment (K = 0),
         (b) stage 1: recurrent latent segment of K steps + ROI alignment loss,
   then, from (b)'s weights, on the fresh prompts (no ROI: the answer is used only to score
   rollouts, or as the SFT target):
         (c)  stage 2: VLPO with the latent term (sigma > 0),
         (c0) text-only VLPO (sigma = 0: no latent exploration, no latent term),
         (s)  supervised fine-tuning on the same prompts for as many optimiser steps;
3. evaluate all on the test split (greedy, the same decoding for all), with paired differences
   against (b) and bootstrap 95% CIs per question type (medlvr/eval/paired.py), the latent
   ablation of (b) and (c) (medlvr/eval/ablation.py), the accuracy plot with CIs and
   the VLPO reward curve (smoothed training reward and periodic greedy validation accuracy).

Everything is seeded: the same command prints the same table on the same machine (CPU
floating point can differ between machines). docs/training.md records how the settings were
chosen (validation split only) and what the demo measured.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch


# The demo's synthetic answers are scored with medlvr's own rule, with which its table (and
# README's numbers) were made; benchmarks are scored with their toolkits' protocols
# (medlvr/data/scoring/, docs/scoring.md).
DEMO_PROTOCOL = "medlvr"


@dataclass(frozen=True)
class DemoPlan:
    n_records: int = 2000          # synthesised records: 700 train / 200 val / 1100 test
    splits: tuple[float, float, float] = (0.35, 0.1, 0.55)
    difficulty: str = "easy"
    roi_fraction: float = 0.5      # of the records with a lesion; partial annotation on purpose
    k_latent: int = 4
    roi_weight: float = 1.0
    sft_steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 10
    vlpo_records: int = 400        # fresh prompts for stage 2 (another seed, no ROI)
    vlpo_steps: int = 40
    vlpo_prompts: int = 8
    vlpo_rollouts: int = 8
    vlpo_lr: float = 3e-4          # chosen on the val split (docs/training.md)
    vlpo_epochs: int = 2           # > 1: later epochs are off-policy, so the clip acts
    vlpo_sigma: float = 0.1
    vlpo_kl: float = 0.04
    vlpo_latent_coef: float = 0.1
    vlpo_w_format: float = 0.0     # the format reward is ~1 for every rollout of (b): no signal
    sft2_lr: float = 1e-4          # (s): SFT on the stage-2 prompts, constant lr
    eval_every: int = 10           # VLPO steps between greedy validation accuracies (0: none)
    curve_records: int = 100       # validation records of the reward curve
    ablation_records: int = 300    # test records of the latent ablation (0: none)
    eval_records: int | None = None  # None: the whole test split
    max_new_tokens: int = 6
    seed: int = 0
    stage2_seeds: tuple[int, ...] = (0, 1, 2)
    image_format: str = "png"      # "dicom": the same images as CT-like DICOM (medlvr.data.synth)


FULL = DemoPlan()
QUICK = DemoPlan(n_records=96, splits=(0.5, 0.15, 0.35), sft_steps=6, batch_size=8, warmup_steps=0, vlpo_records=8,
                 vlpo_steps=2, vlpo_prompts=2, vlpo_rollouts=2, eval_every=1, curve_records=4, ablation_records=8,
                 eval_records=16, stage2_seeds=(0,))
LABELS = {"a_sft": "(a) SFT", "b_stage1": "(b) stage 1", "c_vlpo": "(c) stage 1+2",
          "c0_text": "(c0) 1+2 σ=0", "s_sft2": "(s) 1+SFT"}


def _stage2(plan: DemoPlan, name: str, seed: int, init: Path, rl_prompts, val, out: Path, *, device, accelerator,
            progress: bool, mixed_precision: str) -> tuple[Path, list[dict]]:
    """One stage-2 run from (b)'s weights: VLPO (c), text-only VLPO (c0) or SFT (s)."""
    from medlvr.eval.evaluate import evaluate
    from medlvr.train.loop import LoopConfig
    from medlvr.policy import RunDir, load_trained
    from medlvr.train.sft import train_stage1
    from medlvr.train.vlpo import VLPOConfig, train_vlpo, vlpo_loop

    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    lm, processor, meta = load_trained(init, device=device)
    if name.startswith("s_"):
        cfg = LoopConfig(out_dir=str(run_dir), max_steps=plan.vlpo_steps * plan.vlpo_epochs,
                         batch_size=plan.vlpo_prompts, lr=plan.sft2_lr, schedule="constant", seed=seed,
                         log_every=max(1, plan.vlpo_steps // 10), progress=progress, mixed_precision=mixed_precision,
                         device=device.type)
        res = train_stage1(lm, processor, rl_prompts, cfg, base="default", desc=f"({name}) SFT on stage-2 prompts",
                           extra_meta={"init": str(init)})
        return Path(res["final_dir"]), []
    sigma = plan.vlpo_sigma if name.startswith("c_") else 0.0
    vcfg = VLPOConfig(k_latent=plan.k_latent, batch_prompts=plan.vlpo_prompts, n_rollouts=plan.vlpo_rollouts,
                      latent_sigma=sigma, kl_beta=plan.vlpo_kl, latent_coef=plan.vlpo_latent_coef,
                      ppo_epochs=plan.vlpo_epochs, w_format=plan.vlpo_w_format, max_new_tokens=plan.max_new_tokens,
                      loop=vlpo_loop(out_dir=str(run_dir), max_steps=plan.vlpo_steps, lr=plan.vlpo_lr, seed=seed,
                                     progress=progress, mixed_precision=mixed_precision, device=device.type))
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    curve = list(val[:plan.curve_records])

    def val_acc(step: int, row: dict) -> dict | None:
        if not plan.eval_every or not curve or ((step + 1) % plan.eval_every and step + 1 != plan.vlpo_steps):
            return None
        r = evaluate(lm, processor, curve, max_new_tokens=plan.max_new_tokens, progress=False, protocol=DEMO_PROTOCOL,
                     mixed_precision=mixed_precision)
        return {"val_accuracy": r.overall}

    lm.train()
    history = train_vlpo(lm.model, processor, rl_prompts, vcfg, log_path=metrics,
                         projector=lm.projector, accelerator=accelerator, on_step=val_acc)
    if plan.eval_every and curve:
        history.insert(0, {"step": -1, "val_accuracy": evaluate(load_trained(init, device=device)[0], processor, curve,
                                                                protocol=DEMO_PROTOCOL,
                                                                max_new_tokens=plan.max_new_tokens, progress=False,
                                                                mixed_precision=mixed_precision).overall})
    run = RunDir(run_dir / "final").save(lm, {**meta, "vlpo": asdict(vcfg), "init": str(init)}, accelerator=accelerator)
    return run.path, history


def _seed_mean(runs: list):
    """One result whose per-record correctness is the mean over the seeds' runs (same records,
    same order): its accuracy is the seeds' mean accuracy, and paired differences against it
    carry the seed-to-seed spread into the bootstrap."""
    from medlvr.eval.evaluate import summarize

    preds = [dict(p, correct=sum(r.predictions[i]["correct"] for r in runs) / len(runs), prediction=None)
             for i, p in enumerate(runs[0].predictions)]
    return summarize(preds)


def _ordering(diffs: dict[str, dict[str, tuple]]) -> str:
    """Each run against (b), overall: better / worse only when the paired 95% CI excludes 0."""
    parts = []
    for pair, d in diffs.items():
        diff, lo, hi, _ = d["overall"]
        verdict = "better than" if lo > 0 else "worse than" if hi < 0 else "not separable from"
        other, base = pair.split(" - ", 1)
        parts.append(f"{other} {verdict} {base} ({100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}])")
    return "; ".join(parts)


def _mean_by_step(hists: list[list[dict]], key: str) -> list[tuple[int, float]]:
    by: dict[int, list[float]] = {}
    for hist in hists:
        for h in hist:
            if key in h:
                by.setdefault(h["step"] + 1, []).append(h[key])
    return [(x, sum(v) / len(v)) for x, v in sorted(by.items())]


def save_curve(histories: dict[str, list[list[dict]]], path: Path, *, window: int = 5) -> Path | None:
    """Stage 2's reward curve per kind of VLPO run, averaged over its seeds: the training
    reward (moving mean over ``window`` steps) and the periodic greedy validation accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(any(h) for h in histories.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, hists) in enumerate(histories.items()):
        color, seeds = f"C{i}", f" ({len(hists)} seeds)" if len(hists) > 1 else ""
        pts = _mean_by_step(hists, "reward")
        rew = [y for _, y in pts]
        smooth = [sum(rew[max(0, j - window + 1):j + 1]) / len(rew[max(0, j - window + 1):j + 1])
                  for j in range(len(rew))]
        ax.plot([x for x, _ in pts], smooth, color=color, label=f"{name}: train reward{seeds}, {window}-step mean")
        acc = _mean_by_step(hists, "val_accuracy")
        if acc:
            ax.plot(*zip(*acc), "o--", color=color, ms=4, label=f"{name}: greedy val accuracy{seeds}")
            for j, (x, y) in enumerate(acc):
                ax.annotate(f"{100 * y:.1f}", (x, y), fontsize=6, textcoords="offset points",
                            xytext=(0, 5 if i % 2 == 0 else -10), ha="center", color=color)
    ax.set_xlabel("VLPO step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title("stage 2: training reward and held-out accuracy")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(out_dir: str | Path, plan: DemoPlan = FULL, *, progress: bool = True,
             mixed_precision: str = "auto", device: str = "auto") -> dict:
    """Run the demo into ``out_dir``; returns the summary dict (also written to summary.json).

    Every phase runs on ``device`` ("auto": the GPU when there is one), under
    ``mixed_precision`` autocast ("auto": bf16 on a GPU, none on the CPU; "bf16" on a CPU
    runs the GPU's numerics)."""
    from medlvr.devices import resolve_mixed_precision
    from medlvr.train.loop import make_accelerator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    train, val, test, rl_prompts = _demo_data(plan, out, times)
    run = dict(progress=progress, mixed_precision=mixed_precision)
    finals = _stage1_runs(plan, train, out, times, device=device, **run)
    accelerator = make_accelerator(mixed_precision, device=device)
    labels = dict(LABELS)
    histories = _stage2_runs(plan, finals, labels, rl_prompts, val, out, times, accelerator=accelerator, **run)
    t = time.perf_counter()
    results, ablations = _evaluate_runs(plan, finals, labels, test, device=accelerator.device, **run)
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    return _report(plan, out, results, ablations, labels=labels, histories=histories, times=times,
                   n_test=len(test), device=accelerator.device,
                   precision=resolve_mixed_precision(mixed_precision, device))


def _demo_data(plan: DemoPlan, out: Path, times: dict) -> tuple[list, list, list, list]:
    """(train, val, test, stage-2 prompts): the synthetic records, written under ``out``."""
    from medlvr.data.records import load_jsonl
    from medlvr.data.synth import synthesize

    t = time.perf_counter()
    paths = synthesize(out / "data", n=plan.n_records, seed=plan.seed, roi_fraction=plan.roi_fraction,
                       difficulty=plan.difficulty, split_fractions=plan.splits, image_format=plan.image_format)
    train, val, test = (load_jsonl(paths[s])[0] for s in ("train", "val", "test"))
    # Stage 2 runs on prompts stage 1 has not fitted (on the SFT set nearly every rollout is
    # right and group advantages are ~0): a fresh draw of the same distribution, without ROI.
    rl_paths = synthesize(out / "data_rl", n=plan.vlpo_records, seed=plan.seed + 1, roi_fraction=0.0,
                          difficulty=plan.difficulty, split_fractions=(1.0, 0.0, 0.0), image_format=plan.image_format)
    rl_prompts, _ = load_jsonl(rl_paths["train"])
    if plan.eval_records is not None:
        test = test[:plan.eval_records]
    times["synth"] = time.perf_counter() - t
    print(f"data: {len(train)} train / {len(val)} val / {len(test)} test records, {len(rl_prompts)} stage-2 prompts")
    return train, val, test, rl_prompts


def _stage1_runs(plan: DemoPlan, train: list, out: Path, times: dict, *, progress: bool, mixed_precision: str,
                 device: str) -> dict[str, Path]:
    """Runs (a) plain SFT and (b) stage 1 from the same initial model; their final folders."""
    from medlvr.models import build_default
    from medlvr.train.loop import LoopConfig
    from medlvr.policy import build_trainable
    from medlvr.train.sft import Stage1Config, train_stage1

    finals: dict[str, Path] = {}
    for name, s1 in {"a_sft": Stage1Config(k_latent=0),
                     "b_stage1": Stage1Config(k_latent=plan.k_latent, mode="recurrent",
                                              roi_weight=plan.roi_weight)}.items():
        t = time.perf_counter()
        model, processor = build_default(seed=plan.seed)
        loop = LoopConfig(out_dir=str(out / name), max_steps=plan.sft_steps, batch_size=plan.batch_size, lr=plan.lr,
                          warmup_steps=plan.warmup_steps, seed=plan.seed, log_every=max(1, plan.sft_steps // 20),
                          progress=progress, mixed_precision=mixed_precision, device=device)
        res = train_stage1(build_trainable(model, processor, s1), processor, train, loop, base="default",
                           desc=f"({name[0]}) {'plain SFT' if s1.k_latent == 0 else f'stage 1, K={s1.k_latent}'}")
        finals[name] = Path(res["final_dir"])
        times[name] = time.perf_counter() - t
    return finals


def _stage2_runs(plan: DemoPlan, finals: dict[str, Path], labels: dict[str, str], rl_prompts, val, out: Path,
                 times: dict, *, accelerator, progress: bool, mixed_precision: str) -> dict[str, list]:
    """The stage-2 runs of every seed from (b), added to ``finals`` and ``labels``; their
    training histories by kind of run."""
    histories: dict[str, list] = {}
    for seed in plan.stage2_seeds:
        for kind in ("c_vlpo", "c0_text", "s_sft2"):
            name = kind if len(plan.stage2_seeds) == 1 else f"{kind}_s{seed}"
            labels.setdefault(name, f"{LABELS[kind]} s{seed}")
            t = time.perf_counter()
            finals[name], hist = _stage2(plan, name, seed, finals["b_stage1"], rl_prompts, val, out,
                                         device=accelerator.device,
                                         accelerator=accelerator, progress=progress, mixed_precision=mixed_precision)
            if hist:
                histories.setdefault(LABELS[kind], []).append(hist)
            times[name] = time.perf_counter() - t
    return histories


def _evaluate_runs(plan: DemoPlan, finals: dict[str, Path], labels: dict[str, str], test: list, *, device,
                   progress: bool, mixed_precision: str) -> tuple[dict, dict]:
    """(results by label, latent ablations by label) on the test records; with several
    stage-2 seeds, each kind's mean over them as well."""
    from medlvr.eval.evaluate import evaluate
    from medlvr.eval.ablation import latent_ablation
    from medlvr.policy import load_trained

    results, ablations = {}, {}
    for name, path in finals.items():
        lm, processor, _ = load_trained(path, device=device)
        results[labels[name]] = evaluate(lm, processor, test, max_new_tokens=plan.max_new_tokens, progress=progress,
                                         protocol=DEMO_PROTOCOL,
                                         mixed_precision=mixed_precision)
        if plan.ablation_records and (name == "b_stage1" or name.startswith("c_vlpo")):
            ablations[labels[name]] = latent_ablation(lm, processor, test[:plan.ablation_records],
                                                      sigmas=(plan.vlpo_sigma, 1.0), max_new_tokens=plan.max_new_tokens,
                                                      seed=plan.seed)
    if len(plan.stage2_seeds) > 1:
        for kind in ("c_vlpo", "c0_text", "s_sft2"):
            runs = [results[labels[f"{kind}_s{s}"]] for s in plan.stage2_seeds]
            results[f"{LABELS[kind]} mean"] = _seed_mean(runs)
    return results, ablations


def _report(plan: DemoPlan, out: Path, results: dict, ablations: dict, *, labels: dict[str, str], histories: dict,
            times: dict, n_test: int, device, precision: str) -> dict:
    """Print and write the tables, the plots and summary.json; the summary."""
    from medlvr.eval.evaluate import compare
    from medlvr.eval.outputs import print_table, save_plot, write_outputs
    from medlvr.eval.ablation import format_ablation
    from medlvr.eval.paired import format_paired

    title = f"medlvr demo: held-out synthetic test ({n_test} records)"
    text = print_table(results, title=title)
    base = labels["b_stage1"]
    order = {base: results[base], **{n: r for n, r in results.items() if n != base}}
    diffs = compare(order)
    paired = format_paired(diffs, title="paired accuracy differences vs (b), points [bootstrap 95% CI]")
    abl = format_ablation(ablations, title=f"latent ablation ({plan.ablation_records} test records)") if ablations \
        else ""
    files = write_outputs(results, out, title=title, comparison={"paired": diffs, "ablation": ablations})
    if len(plan.stage2_seeds) > 1:  # the plot: (a), (b) and the seed means (per-seed bars are in the table)
        save_plot({n: r for n, r in results.items() if not any(n.endswith(f" s{x}") for x in plan.stage2_seeds)},
                  files["plot"], title=title)
    ordering = _ordering(diffs)
    print(f"ordering (what the paired 95% CIs support): {ordering}")
    curve = save_curve(histories, out / "vlpo_curve.png")
    summary = {"plan": asdict(plan), "device": str(device), "mixed_precision": precision,
               "accuracy": {n: r.overall for n, r in results.items()},
               "by_qtype": {n: {q: v[0] for q, v in r.by_qtype.items()} for n, r in results.items()},
               "paired_vs_b": diffs, "ablation": ablations, "seconds": times, "threads": torch.get_num_threads(),
               "files": {**{k: str(v) for k, v in files.items()}, "curve": str(curve) if curve else None},
               "ordering": ordering, "table": text, "paired_table": paired, "ablation_table": abl,
               "vlpo_history": histories}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wall time {times['total']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in times.items() if k != 'total')});"
          f" plot {files['plot']}, curve {curve}, summary {out / 'summary.json'}")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    from medlvr.devices import DEVICES, MIXED_PRECISION

    p.add_argument("--quick", action="store_true", help="a smoke-test sized run (well under a minute)")
    p.add_argument("--out", default="demo_out", help="output directory (data, runs, plots, summary.json)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data, the model init and stage 1 (default 0)")
    p.add_argument("--stage2-seeds", default=None,
                   help="comma-separated seeds of the stage-2 runs (default 0,1,2; --quick: 0)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto",
                   help="autocast for every phase: auto = bf16 on a GPU, none on the CPU")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto = the GPU when there is one, else the CPU (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--format", choices=("png", "dicom"), default="png", dest="image_format",
                   help="synthetic images as PNG (default) or CT-like DICOM (the same pixels after windowing)")


def run(args: argparse.Namespace) -> int:
    plan = replace(QUICK if args.quick else FULL, seed=args.seed, image_format=getattr(args, "image_format", "png"))
    if getattr(args, "stage2_seeds", None):
        plan = replace(plan, stage2_seeds=tuple(int(s) for s in args.stage2_seeds.split(",")))
    run_demo(args.out, plan, progress=not args.no_progress, mixed_precision=args.mixed_precision,
             device=args.device)
    return 0
