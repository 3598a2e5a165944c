"""What ``medlvr eval`` and the demo write of evaluation results: a rich table, a bar plot with
bootstrap CIs, and the files (predictions.jsonl, accuracy.json, accuracy.png, comparison.json)."""
from __future__ import annotations

import json
from pathlib import Path

from medlvr.eval.evaluate import EvalResult

__all__ = ["print_table", "save_plot", "write_outputs"]


def print_table(results: dict[str, EvalResult], *, title: str = "accuracy") -> str:
    """A rich table: one column per model, rows = overall, each benchmark, each question type.
    Returns the plain-text rendering (also printed)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    names = list(results)
    first = results[names[0]]
    table = Table(title=title)
    table.add_column("benchmark / question type")
    table.add_column("n", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_row("overall", str(first.n), *[f"{100 * results[m].overall:.1f}" for m in names])
    for s in first.by_source:
        table.add_row(escape(f"[{s}]"), str(first.by_source[s][1]), *[f"{100 * results[m].by_source.get(s, (0, 0))[0]:.1f}" for m in names])
    for q in first.by_qtype:
        table.add_row(f"  {q}", str(first.by_qtype[q][1]), *[f"{100 * results[m].by_qtype.get(q, (0, 0))[0]:.1f}" for m in names])
    console = Console(record=True, width=max(60, 30 + 12 * len(names)))
    console.print(table)
    return console.export_text()


def save_plot(results: dict[str, EvalResult], path: str | Path, *, title: str = "accuracy") -> Path:
    """Grouped bars: overall and each question type (x) for each model (bars), with bootstrap
    95% CIs as error bars (medlvr.eval.paired.accuracy_cis) and one-decimal labels."""
    import matplotlib

    from medlvr.eval.paired import accuracy_cis

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cats = ["overall"] + list(results[names[0]].by_qtype)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cats), 4.0))
    for j, name in enumerate(names):
        r = results[name]
        vals = [r.overall] + [r.by_qtype.get(c, (0.0, 0))[0] for c in cats[1:]]
        ci = accuracy_cis(r)
        lo = [100 * (v - ci[c][1]) if c in ci else 0.0 for v, c in zip(vals, cats)]
        hi = [100 * (ci[c][2] - v) if c in ci else 0.0 for v, c in zip(vals, cats)]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(cats))]
        bars = ax.bar(xs, [100 * v for v in vals], width, label=name, yerr=[lo, hi], capsize=2,
                      error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 112)
    ax.set_title(title)
    # Below the axes: inside, the legend hides the tallest bars.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(names), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: dict[str, EvalResult], out_dir: str | Path, *, title: str = "accuracy",
                  comparison: dict | None = None) -> dict[str, Path]:
    """predictions.jsonl, accuracy.json, accuracy.png (and comparison.json: paired differences
    and latent ablations, when given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if comparison is not None:
        (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    with (out / "predictions.jsonl").open("w") as f:
        for name, r in results.items():
            for p in r.predictions:
                f.write(json.dumps({"model": name, **p}) + "\n")
    (out / "accuracy.json").write_text(json.dumps({n: r.to_json() for n, r in results.items()}, indent=2))
    return {"predictions": out / "predictions.jsonl", "accuracy": out / "accuracy.json",
            "plot": save_plot(results, out / "accuracy.png", title=title)}
