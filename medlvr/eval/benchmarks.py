"""The table papers print: runs x benchmarks, evaluated under one scoring protocol.

Per run and benchmark, the accuracy over the records the protocol counts; the average over the
benchmarks (the macro mean every MedLVR-style table reports: each benchmark weighs the same,
whatever its size); closed / open per benchmark (the records' ``answer_type``); per modality where
the records name one (OmniMedVQA); and each run against the first with paired 95% CIs, per
benchmark (medlvr/eval/paired.py) and for the average. The average's interval resamples each
benchmark's records on their own and averages the per-benchmark differences (a stratified paired
bootstrap: the benchmarks are fixed, their records are the sample).
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from medlvr.eval.evaluate import EvalResult, counted_accuracy
from medlvr.eval.paired import paired_columns, paired_differences

__all__ = ["BenchmarkTable", "benchmark_table", "macro_paired_difference", "write_benchmark_table"]


@dataclass
class BenchmarkTable:
    """accuracy[run][bench] (fraction, n counted); average[run]; split[run][bench][answer_type];
    modality[run][bench][modality]; paired[run][bench or "average"] = (diff, lo, hi, n) against
    the first run; settings: what produced the numbers (protocol, prompt and image bound, decoding)."""
    runs: list[str]
    benches: list[str]
    accuracy: dict[str, dict[str, tuple[float, int]]]
    average: dict[str, float]
    split: dict[str, dict[str, dict[str, tuple[float, int]]]]
    modality: dict[str, dict[str, dict[str, tuple[float, int]]]]
    paired: dict[str, dict[str, tuple[float, float, float, int]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _acc(rows: list[dict]) -> tuple[float, int]:
    return counted_accuracy(rows, empty=float("nan"))


def _groups(preds: list[dict], key: str) -> dict[str, tuple[float, int]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for p in preds:
        by[str(p.get(key) or "unknown")].append(p)
    return {k: _acc(v) for k, v in sorted(by.items())}


def macro_paired_difference(pairs: Mapping[str, tuple[list[float], list[float]]], *, n_boot: int = 2000,
                            seed: int = 0) -> tuple[float, float, float, int]:
    """(diff, lo, hi, n): mean over benchmarks of acc(other) - acc(base) and its stratified
    paired bootstrap 95% interval. pairs: bench -> (base correctness, other correctness), paired
    record by record."""
    if not pairs:
        raise ValueError("pairs: expected at least one benchmark, got none")
    g = torch.Generator().manual_seed(seed)
    diffs = torch.zeros(n_boot, dtype=torch.float64)
    point, n = 0.0, 0
    for bench, (a, b) in pairs.items():
        d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
        if d.numel() == 0:
            raise ValueError(f"pairs[{bench!r}]: expected paired records, got none")
        point += float(d.mean())
        n += d.numel()
        idx = torch.randint(0, d.numel(), (n_boot, d.numel()), generator=g)
        diffs += d[idx].mean(1)
    k = len(pairs)
    lo, hi = torch.quantile(diffs / k, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point / k, lo, hi, n


def _paired_columns(a: EvalResult, b: EvalResult) -> tuple[list[float], list[float]]:
    ra, rb = paired_columns(a, b)
    return [float(p["correct"]) for p in ra], [float(p["correct"]) for p in rb]


def benchmark_table(results: Mapping[str, Mapping[str, EvalResult]], *, n_boot: int = 2000,
                    seed: int = 0) -> BenchmarkTable:
    """results[run][bench]: every run evaluated on every benchmark (the same records)."""
    runs = list(results)
    if not runs:
        raise ValueError("results: expected at least one run, got none")
    benches = list(results[runs[0]])
    for r in runs:
        if list(results[r]) != benches:
            raise ValueError(f"results[{r!r}]: expected the benchmarks {benches}, got {list(results[r])}")
    acc = {r: {b: _acc(results[r][b].predictions) for b in benches} for r in runs}
    t = BenchmarkTable(runs=runs, benches=benches, accuracy=acc,
                       average={r: sum(acc[r][b][0] for b in benches) / len(benches) for r in runs},
                       split={r: {b: _groups(results[r][b].predictions, "answer_type") for b in benches} for r in runs},
                       modality={r: {b: _groups(results[r][b].predictions, "modality") for b in benches
                                     if any(p.get("modality") not in (None, "unknown")
                                            for p in results[r][b].predictions)} for r in runs},
                       settings={b: results[runs[0]][b].settings for b in benches})
    base = runs[0]
    for r in runs[1:]:
        t.paired[r] = {b: paired_differences(results[base][b], results[r][b], n_boot=n_boot, seed=seed)["overall"]
                       for b in benches}
        t.paired[r]["average"] = macro_paired_difference(
            {b: _paired_columns(results[base][b], results[r][b]) for b in benches}, n_boot=n_boot, seed=seed)
    return t


def _pct(v: tuple) -> str:
    return "—" if v[1] == 0 else f"{100 * v[0]:.1f}"


def _ci(v: tuple) -> str:
    return f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"


def markdown(t: BenchmarkTable) -> str:
    """The tables in Markdown: accuracy (and the average), closed / open, modality, paired CIs."""
    head = "| run | " + " | ".join(t.benches) + " | average |\n|---|" + "---:|" * (len(t.benches) + 1)
    lines = ["### Accuracy (%)", "", head]
    for r in t.runs:
        lines.append(f"| {r} | " + " | ".join(_pct(t.accuracy[r][b]) for b in t.benches)
                     + f" | {100 * t.average[r]:.1f} |")
    lines.append("| n | " + " | ".join(str(t.accuracy[t.runs[0]][b][1]) for b in t.benches) + " | |")
    kinds = sorted({k for r in t.runs for b in t.benches for k in t.split[r][b]})
    lines += ["", "### Closed / open (%)", "",
              "| run | " + " | ".join(f"{b} {k}" for b in t.benches for k in kinds) + " |",
              "|---|" + "---:|" * (len(t.benches) * len(kinds))]
    for r in t.runs:
        lines.append(f"| {r} | " + " | ".join(_pct(t.split[r][b].get(k, (0.0, 0))) for b in t.benches for k in kinds)
                     + " |")
    for b in sorted({b for r in t.runs for b in t.modality[r]}):
        mods = sorted(t.modality[t.runs[0]].get(b, {}))
        lines += ["", f"### {b} by modality (%)", "", "| run | " + " | ".join(mods) + " |",
                  "|---|" + "---:|" * len(mods)]
        for r in t.runs:
            lines.append(f"| {r} | " + " | ".join(_pct(t.modality[r][b].get(m, (0.0, 0))) for m in mods) + " |")
    if t.paired:
        lines += ["", f"### Against {t.runs[0]}: paired difference, points [95% CI]", "",
                  "| run | " + " | ".join(t.benches) + " | average |", "|---|" + "---:|" * (len(t.benches) + 1)]
        for r, row in t.paired.items():
            lines.append(f"| {r} | " + " | ".join(_ci(row[b]) for b in t.benches) + f" | {_ci(row['average'])} |")
    return "\n".join(lines) + "\n"


def _plot(t: BenchmarkTable, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = t.benches + ["average"]
    width = 0.8 / len(t.runs)
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(cats), 4.0))
    for j, r in enumerate(t.runs):
        vals = [100 * t.accuracy[r][b][0] for b in t.benches] + [100 * t.average[r]]
        xs = [i + (j - (len(t.runs) - 1) / 2) * width for i in range(len(cats))]
        ax.bar_label(ax.bar(xs, vals, width, label=r), fmt="%.1f", fontsize=6, padding=2)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 112)
    protocols = sorted({s.get("protocol", "?") for s in t.settings.values()})
    ax.set_title(f"accuracy by benchmark ({', '.join(protocols)} protocol)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(t.runs), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_benchmark_table(t: BenchmarkTable, out_dir: str | Path) -> dict[str, Path]:
    """report.md (with the settings that produced it), report.csv (one row per run, benchmark
    and group), report.json, report.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"- {b}: protocol `{s.get('protocol')}`; prompt {json.dumps(s.get('prompt'))}; "
             f"decoding {json.dumps({k: v for k, v in (s.get('decoding') or {}).items() if k != 'notice'})}"
             for b, s in t.settings.items()]
    (out / "report.md").write_text(markdown(t) + "\nSettings (of the first run; image bounds in pixels):\n\n"
                                   + "\n".join(notes) + "\n")
    with (out / "report.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "benchmark", "group", "accuracy", "n"])
        for r in t.runs:
            for b in t.benches:
                w.writerow([r, b, "all", t.accuracy[r][b][0], t.accuracy[r][b][1]])
                for k, v in t.split[r][b].items():
                    w.writerow([r, b, f"answer_type={k}", v[0], v[1]])
                for k, v in t.modality[r].get(b, {}).items():
                    w.writerow([r, b, f"modality={k}", v[0], v[1]])
            w.writerow([r, "average", "all", t.average[r], ""])
    (out / "report.json").write_text(json.dumps({k: getattr(t, k) for k in t.__dataclass_fields__}, indent=2))
    return {"markdown": out / "report.md", "csv": out / "report.csv", "json": out / "report.json",
            "plot": _plot(t, out / "report.png")}
