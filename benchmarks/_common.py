"""Shared plumbing of the benchmark scripts: timing, peak memory, tables, CSV and plots.

Every bench_*.py times an op side by side with its peers in one run, then calls
``report`` which prints a Markdown table (with ratios to the first provider), and writes
``benchmarks/results/<name>-<device>.csv``, ``.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    env = {
        "date": _dt.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "threads": torch.get_num_threads(),
    }
    for pkg in ("triton", "transformers", "medlvr"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "absent"
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], *, device: torch.device, warmup: int = 3, iters: int = 10,
            setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn()`` in ms. ``setup`` runs before each call, untimed
    (e.g. zeroing a .grad or cloning an input a fast path overwrites)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    samples = []
    for _ in range(iters):
        if setup is not None:
            setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """(the caching allocator's peak during ``fn()`` above what was allocated before, its result)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base), out


def peak_extra_bytes(fn: Callable[[], object], *, device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` beyond what was live when it started.

    CUDA: the caching allocator's peak statistic. CPU: the running sum of the torch
    profiler's allocation events (exact for tensor memory, which is what we compare).
    Whatever ``fn`` returns is dropped before the next measurement.
    """
    gc.collect()
    if device.type == "cuda":
        peak, out = _cuda_peak(fn, device)
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    # An op's memory figure includes its children's, so only the *self* part of each
    # event is summed (else an aten::empty inside an op counts twice); frees outside any
    # op arrive as "[memory]" events. The running sum in time order peaks at the answer.
    # A net free of a parent scope (autograd's MmBackward releasing its saved input after
    # its child mm's allocated the gradients) happens at the scope's end, not its start.
    live = peak = 0
    events = [e for e in prof.events() if getattr(e, "self_cpu_memory_usage", 0)]
    for e in sorted(events, key=lambda e: e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def peak_beyond_outputs(fn: Callable[[], object], *, device: torch.device) -> tuple[int, int]:
    """(peak bytes allocated by ``fn()`` beyond what was live when it started, the same peak not
    counting the tensors ``fn`` returns), e.g. the memory of a forward + backward beyond the
    gradients it hands back, whenever in the call they were allocated.

    CPU: the allocator's running total from the profiler's allocation events, the returned
    tensors' storages recognised by address. CUDA: the caching allocator's peak minus the
    returned tensors' bytes (a lower bound of the second figure when the peak came before
    the outputs existed).
    """
    gc.collect()
    if device.type == "cuda":
        peak, out = _cuda_peak(fn, device)
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        nbytes = sum(t.untyped_storage().nbytes() for t in outs)
        del out, outs
        return int(peak), int(max(peak - nbytes, 0))
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        ptrs = {t.untyped_storage().data_ptr() for t in outs}
        del out, outs
    allocs = []  # (time, ptr, +-bytes, allocator total after the event)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            e = node.extra_fields
            allocs.append((node.start_time_ns, e.ptr, e.alloc_size, e.total_allocated))
        stack.extend(node.children)
    if not allocs:
        return 0, 0
    allocs.sort(key=lambda a: a[0])
    # An output's storage is the LAST allocation at its address (addresses are reused).
    last = {ptr: i for i, (_, ptr, size, _) in enumerate(allocs) if size > 0 and ptr in ptrs}
    base = allocs[0][3] - allocs[0][2]
    live_out = peak = peak_wo = 0
    for i, (_, ptr, size, total) in enumerate(allocs):
        if ptr in last and i >= last[ptr]:
            live_out += size
        peak = max(peak, total - base)
        peak_wo = max(peak_wo, total - base - live_out)
    return int(peak), int(peak_wo)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for CSV, Markdown and PNG")
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    return p


def cpu_threads(args: argparse.Namespace, device: torch.device) -> None:
    """Apply ``--threads`` on a CPU run (default: 1 for --quick smoke runs, where intra-op
    threads only add OpenMP wake-ups on tiny ops; else torch's own default)."""
    if device.type == "cpu":
        torch.set_num_threads(args.threads or (1 if args.quick else torch.get_num_threads()))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def report(name: str, rows: Sequence[dict], *, device: torch.device, out: Path,
           x: str, y: str = "ms", group: str = "provider", title: str | None = None,
           notes: Sequence[str] = ()) -> Path:
    """Print ``rows`` as a Markdown table and write CSV, Markdown and a bar plot.

    rows: one dict per (case, provider) measurement. ``x`` names the column that
    identifies the case (e.g. "shape"), ``y`` the value plotted, ``group`` the provider.
    """
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    stem = out / f"{name}-{env['device']}"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    header = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    md = f"# {title or name}\n\n{env_line}\n\n{header}{body}" + "".join(f"\n{n}\n" for n in notes)
    print(md)
    stem.with_suffix(".md").write_text(md)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns + list(env))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **env})
    _plot(rows, stem.with_suffix(".png"), x=x, y=y, group=group, title=f"{title or name} ({env['device']})")
    return stem


def _plot(rows, path: Path, *, x: str, y: str, group: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(str(r[x]) for r in rows))
    providers = list(dict.fromkeys(r[group] for r in rows))
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) * max(1, len(providers) / 3)), 4))
    for i, p in enumerate(providers):
        xs, ys = [], []
        for j, c in enumerate(cases):
            vals = [r[y] for r in rows if str(r[x]) == c and r[group] == p and r.get(y) not in (None, "")]
            if vals:
                xs.append(j + i * width)
                ys.append(vals[0])
        ax.bar(xs, ys, width=width, label=p)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=15, fontsize=8)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
