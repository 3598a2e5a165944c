"""``medlvr report``: trained runs on several benchmarks, the table papers print (medlvr/eval/benchmarks.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from medlvr.data.scoring import DEFAULT_PROTOCOL, protocol_names
    from medlvr.devices import DEVICES

    p.add_argument("--run", action="append", required=True, metavar="[NAME=]DIR",
                   help="a trained run directory (run.json + model.safetensors); repeat: the first is the baseline "
                        "of the paired CIs")
    p.add_argument("--bench", action="append", required=True, metavar="[NAME=]JSONL",
                   help="a benchmark's converted JSONL (medlvr convert); repeat for each benchmark of the table")
    p.add_argument("--split", default="test", help="records of this split (default test; '' = all)")
    p.add_argument("--protocol", choices=protocol_names(), default=DEFAULT_PROTOCOL,
                   help=f"scoring protocol of every benchmark (docs/scoring.md; default {DEFAULT_PROTOCOL})")
    p.add_argument("--batch-size", type=int, default=32, help="records generated together (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer tokens generated at most (default 16)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired CIs (default 2000)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto = the GPU when there is one")
    p.add_argument("--out", default="runs/report", help="report.md, report.csv, report.json, report.png go here")


def run(args: argparse.Namespace) -> int:
    from medlvr.cli import prompt_from_args, run_name
    from medlvr.data.records import load_jsonl
    from medlvr.devices import trains_on_gpu
    from medlvr.eval.benchmarks import benchmark_table, markdown, write_benchmark_table
    from medlvr.eval.evaluate import evaluate
    from medlvr.policy import load_trained

    device = torch.device("cuda" if trains_on_gpu(args.device) else "cpu")
    benches = {}
    for spec in args.bench:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).stem
        records, bad = load_jsonl(path, split=args.split or None, window=getattr(args, "window", None),
                                  skip_bad=True)
        if bad.n_bad:
            print(bad)
        if not records:
            raise ValueError(f"--bench {spec}: no records of split {args.split!r}")
        benches[name] = records
    results = {}
    for spec in args.run:
        name, path = run_name(spec)
        lm, processor, _ = load_trained(path, device=device, prompt=prompt_from_args(args))
        print(f"{name}: prompt: {lm.prompt.describe()}; protocol {args.protocol}")
        results[name] = {b: evaluate(lm, processor, recs, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, protocol=args.protocol,
                                     repetition_penalty=getattr(args, "repetition_penalty", None))
                         for b, recs in benches.items()}
    table = benchmark_table(results, n_boot=args.bootstrap)
    print(markdown(table))
    paths = write_benchmark_table(table, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
