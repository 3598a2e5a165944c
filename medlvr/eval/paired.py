"""Paired comparison of evaluated runs: accuracy differences on the same records with bootstrap
95% confidence intervals, overall and per question type.

Two runs answer the same N records, so their per-record correctness (c_a, c_b) is paired; the
difference of accuracies is mean(c_b - c_a) and its sampling spread comes from resampling the
N records with replacement (the paired bootstrap: Efron & Tibshirani 1993, "An Introduction to
the Bootstrap", ch. 13, percentile interval; Koehn 2004, "Statistical Significance Tests for
Machine Translation Evaluation", for its use on test sets). Pairing removes the between-record
variance both runs share, which is most of it when they answer most records alike.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["bootstrap_ci", "paired_differences", "paired_columns", "accuracy_cis", "format_paired"]


def bootstrap_ci(values: Sequence[float] | torch.Tensor, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` and its percentile bootstrap interval at ``level``
    (records resampled with replacement ``n_boot`` times, a seeded generator: deterministic).
    For paired differences pass c_b - c_a per record. Empty input: (nan, nan, nan)."""
    if n_boot < 1:
        raise ValueError(f"n_boot: expected >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level}")
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        nan = float("nan")
        return nan, nan, nan
    g = torch.Generator().manual_seed(seed)
    means = torch.empty(n_boot, dtype=torch.float64)
    step = max(1, 2_000_000 // n)  # bounded memory: at most ~2M indices at once
    for b0 in range(0, n_boot, step):
        b1 = min(n_boot, b0 + step)
        idx = torch.randint(0, n, (b1 - b0, n), generator=g)
        means[b0:b1] = v[idx].mean(1)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return float(v.mean()), lo, hi


def _by_id(preds: Sequence[dict]) -> dict:
    out = {}
    for i, p in enumerate(preds):
        key = (p.get("id"), p.get("question"))
        out[key if key not in out else (key, i)] = p
    return out


def paired_columns(base: Any, other: Any) -> tuple[list[dict], list[dict]]:
    """The two runs' prediction rows on the records both answered and both count (matched by id
    and question; a protocol that leaves a record out leaves it out of the pair), in base's order.
    base, other: EvalResults of medlvr/eval/evaluate.py, or lists of their prediction dicts."""
    pa = base.predictions if hasattr(base, "predictions") else base
    pb = other.predictions if hasattr(other, "predictions") else other
    a, b = _by_id(pa), _by_id(pb)
    keys = [k for k in a if k in b and a[k].get("counted", True) and b[k].get("counted", True)]
    if not keys:
        raise ValueError("other: expected predictions on the same records as base (matched by id), got none shared")
    return [a[k] for k in keys], [b[k] for k in keys]


def paired_differences(base: Any, other: Any, *, n_boot: int = 2000, seed: int = 0) -> dict[str, tuple]:
    """{"overall" | qtype: (diff, lo, hi, n)}: accuracy of ``other`` minus ``base`` (EvalResults of
    medlvr/eval/evaluate.py, or lists of their prediction dicts) on the records both answered
    (matched by id and question), with the paired bootstrap 95% CI; fractions, not percent."""
    groups: dict[str, list[float]] = {"overall": []}
    for ra, rb in zip(*paired_columns(base, other)):
        d = float(rb["correct"]) - float(ra["correct"])
        groups["overall"].append(d)
        groups.setdefault(ra.get("qtype") or "unknown", []).append(d)
    out = {}
    for name in ["overall"] + sorted(g for g in groups if g != "overall"):
        diff, lo, hi = bootstrap_ci(groups[name], n_boot=n_boot, seed=seed)
        out[name] = (diff, lo, hi, len(groups[name]))
    return out


def accuracy_cis(result: Any, *, n_boot: int = 2000, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{"overall" | qtype: (accuracy, lo, hi)}: one run's accuracies with percentile bootstrap
    95% CIs (for the plot's error bars)."""
    groups: dict[str, list[float]] = {"overall": []}
    for p in result.predictions:
        groups["overall"].append(float(p["correct"]))
        groups.setdefault(p.get("qtype") or "unknown", []).append(float(p["correct"]))
    return {k: bootstrap_ci(v, n_boot=n_boot, seed=seed) for k, v in groups.items()}


def format_paired(diffs: dict[str, dict[str, tuple]], *, title: str = "paired differences") -> str:
    """A rich table: one row per category, one column per compared pair ("B - A"), cells
    "+1.6 [+0.1, +3.1]" in accuracy points. Returns the plain-text rendering (also printed)."""
    from rich.console import Console
    from rich.table import Table

    pairs = list(diffs)
    cats = list(next(iter(diffs.values()))) if diffs else []
    table = Table(title=title)
    table.add_column("category")
    table.add_column("n", justify="right")
    for name in pairs:
        table.add_column(name, justify="right")
    for c in cats:
        n = next((d[c][3] for d in diffs.values() if c in d), 0)
        cells = []
        for name in pairs:
            v = diffs[name].get(c)
            cells.append("" if v is None else f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]")
        table.add_row(c, str(n), *cells)
    console = Console(record=True, width=max(60, 24 + 24 * len(pairs)))
    console.print(table)
    return console.export_text()
