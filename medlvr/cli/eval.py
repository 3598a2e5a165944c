"""``medlvr eval``: accuracy of trained runs, paired differences between them and the latent
ablation, from the command line (medlvr/eval/evaluate.py is the evaluation itself)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medlvr.eval.evaluate import compare, evaluate
from medlvr.eval.outputs import print_table, write_outputs

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from medlvr.devices import DEVICES

    p.add_argument("--run", action="append", required=True, metavar="[NAME=]DIR",
                   help="a trained run directory (run.json + model.safetensors, e.g. runs/sft/final); repeat to compare")
    p.add_argument("--data", required=True, help="JSONL to evaluate")
    p.add_argument("--split", default=None, help="only records of this split (default: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad records instead of failing")
    p.add_argument("--k-latent", type=int, default=None, help="override the run's K")
    p.add_argument("--batch-size", type=int, default=32, help="records generated together (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer tokens generated at most (default 8)")
    from medlvr.data.scoring import DEFAULT_PROTOCOL, protocol_names

    p.add_argument("--protocol", choices=protocol_names(), default=DEFAULT_PROTOCOL,
                   help=f"scoring protocol, each a standard toolkit's rule (docs/scoring.md; default {DEFAULT_PROTOCOL}: "
                        "the one toolkit that scores OmniMedVQA, VQA-RAD, SLAKE and PathVQA alike)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF's repetition penalty on the answer tokens (default: the checkpoint's generation_config, "
                        "1.0 when it sets none); answers are greedy whatever the generation_config says")
    p.add_argument("--backend", choices=("auto", "engine", "hf"), default="auto",
                   help="engine = the latent-step engine; hf = the plain HF KV-cached loop; auto = the engine "
                        "where it supports the model (default auto)")
    p.add_argument("--out", default="runs/eval", help="predictions.jsonl, accuracy.json, accuracy.png go here")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto = the GPU when there is one, else the CPU (default auto)")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="autocast around generation: auto = bf16 on a GPU, none on the CPU")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="bootstrap resamples for the paired 95%% CIs of each run against the first (default 2000)")
    p.add_argument("--ablation", action="store_true",
                   help="also report the latent ablation (latents zeroed / shuffled / noised) of runs with K > 0")
    p.add_argument("--ablation-sigma", default="0.1,1.0",
                   help="comma-separated noise levels of the latent ablation (default 0.1,1.0)")


def run(args: argparse.Namespace) -> int:
    from medlvr.data.records import load_jsonl
    from medlvr.eval.ablation import format_ablation, latent_ablation
    from medlvr.eval.paired import format_paired
    from medlvr.devices import trains_on_gpu
    from medlvr.cli import prompt_from_args, run_name
    from medlvr.policy import load_trained

    device = torch.device("cuda" if trains_on_gpu(args.device) else "cpu")
    records, report = load_jsonl(args.data, split=args.split or None, skip_bad=getattr(args, "skip_bad", False),
                                 window=getattr(args, "window", None))
    if report.n_bad:
        print(report)
    sigmas = [float(x) for x in str(getattr(args, "ablation_sigma", "0.1,1.0")).split(",") if x.strip()]
    results, ablations = {}, {}
    for spec in args.run:
        name, path = run_name(spec)
        lm, processor, _meta = load_trained(path, device=device, prompt=prompt_from_args(args))
        results[name] = evaluate(lm, processor, records, k=args.k_latent, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, backend=args.backend,
                                 mixed_precision=args.mixed_precision,
                                 repetition_penalty=getattr(args, "repetition_penalty", None),
                                 protocol=getattr(args, "protocol", None))
        d = results[name].settings["decoding"]
        print(f"{name}: protocol {results[name].settings['protocol']}; prompt: {lm.prompt.describe()}; decoding: "
              f"{d['strategy']}, repetition_penalty "
              f"{d['repetition_penalty']:g}, max_new_tokens {d['max_new_tokens']}, K {d['k_latent']}, {d['backend']}"
              + (f" (notice: {d['notice']})" if d["notice"] else ""))
        if getattr(args, "ablation", False):
            ablations[name] = latent_ablation(lm, processor, records, k=args.k_latent, sigmas=sigmas,
                                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print_table(results, title=f"accuracy on {Path(args.data).name} ({len(records)} records)")
    comparison: dict = {}
    if len(results) > 1:
        diffs = compare(results, n_boot=getattr(args, "bootstrap", 2000))
        format_paired(diffs, title="paired accuracy differences, points [bootstrap 95% CI]")
        comparison["paired"] = diffs
    if ablations:
        format_ablation(ablations)
        comparison["ablation"] = ablations
    paths = write_outputs(results, args.out, comparison=comparison or None)
    print(f"wrote {paths['predictions']}, {paths['accuracy']}, {paths['plot']}")
    return 0
