"""Benchmark: log-prob gathering for VLPO, medlvr against its peers, in one run.

Providers (forward = log-probs of the target tokens, fwd+bwd = plus d logits):
  naive       log_softmax(logits.float() / T).gather(targets)       (what most RL code does)
  chunked     row-chunked selective log-softmax, the approach of TRL's selective_log_softmax
  compiled    torch.compile of the naive form
  medlvr      medlvr.ops.gather_logprobs (C++ on CPU, CUDA on GPU)
  medlvr-inplace  the same with inplace_backward=True (gradient written over the logits)

Columns: ms, peak memory beyond the inputs (and beyond logits + gradient), GB/s of the
memory floor (read logits once forward; read twice + write once forward+backward) and the
fraction of the measured copy bandwidth that represents.

    python benchmarks/bench_logprobs.py                    # CPU: N=512, V=152064, fp32
    python benchmarks/bench_logprobs.py --device cuda      # GPU: N=8192, V=152064, bf16
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from medlvr import force_backend  # noqa: E402
from medlvr._backend import extension, extension_has_cuda  # noqa: E402
from medlvr.ops import gather_logprobs  # noqa: E402


def naive(logits, targets, t):
    return torch.log_softmax(logits.float() / t, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def chunked(logits, targets, t, rows=512):
    # TRL's selective_log_softmax idea: never hold the whole fp32 log_softmax at once.
    out = []
    for lg, tg in zip(logits.split(rows), targets.split(rows)):
        lg = lg.float() / t
        out.append(lg.gather(-1, tg[:, None]).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


def medlvr_op(inplace):
    def f(logits, targets, t):
        with force_backend("ext"):
            return gather_logprobs(logits, targets, temperature=t, inplace_backward=inplace)
    return f


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device copy (read + write), measured in this run."""
    src = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _common.time_ms(lambda: dst.copy_(src), device=device, warmup=2, iters=10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--v", type=int, default=152064)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (8192 if cuda else 512)
    if args.quick:
        n, args.v = min(n, 64), min(args.v, 32000)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    t = args.temperature

    logits0 = (torch.randn(n, args.v, device=device) * 3).to(dtype)
    targets = torch.randint(0, args.v, (n,), device=device)
    x = logits0.clone().requires_grad_(True)
    restore = lambda: x.data.copy_(logits0)  # noqa: E731  the in-place backward overwrites x
    elt = logits0.element_size()
    logits_bytes = n * args.v * elt
    bw = copy_bandwidth(device)

    providers = {"naive": naive, "chunked": chunked}
    if not args.no_compile:
        providers["compiled"] = torch.compile(naive, dynamic=False)
    if extension() is not None and (not cuda or extension_has_cuda()):
        providers["medlvr"] = medlvr_op(False)
        providers["medlvr-inplace"] = medlvr_op(True)

    rows = []
    for name, fn in providers.items():
        def fwd():
            with torch.no_grad():
                return fn(x, targets, t)

        def fwd_bwd():
            lp = fn(x, targets, t)
            # autograd.grad hands back the computed gradient itself (no accumulation copy)
            return torch.autograd.grad(lp.sum(), x)[0]

        try:
            ms_f = _common.time_ms(fwd, device=device, warmup=args.warmup, iters=args.iters, setup=restore)
            ms_fb = _common.time_ms(fwd_bwd, device=device, warmup=args.warmup, iters=args.iters, setup=restore)
            restore()
            peak = _common.peak_extra_bytes(fwd_bwd, device=device)
            restore()
        except Exception as e:  # a peer that cannot run here is reported, not hidden
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            rows.append({"provider": name, "shape": f"N={n} V={args.v} {str(dtype)[6:]}", "status": "failed"})
            continue
        grad_bytes = 0 if name == "medlvr-inplace" else logits_bytes
        floor_fb = 3 * logits_bytes / bw * 1e3
        rows.append({
            "provider": name,
            "shape": f"N={n} V={args.v} {str(dtype)[6:]}",
            "fwd_ms": ms_f,
            "fwd_bwd_ms": ms_fb,
            "peak_extra_MB": peak / 2**20,
            "beyond_grad_MB": (peak - grad_bytes) / 2**20,
            "fwd_bwd_GBps": 3 * logits_bytes / (ms_fb * 1e-3) / 1e9,
            "fraction_of_floor": floor_fb / ms_fb,
            "status": "ok",
        })
    base = next((r for r in rows if r["provider"] == "naive" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["speedup_vs_naive"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["mem_vs_naive"] = r["peak_extra_MB"] / max(base["peak_extra_MB"], 1e-9)
    notes = [f"copy bandwidth measured in this run: {bw / 1e9:.1f} GB/s; memory floor fwd+bwd = "
             f"3 x {logits_bytes / 1e9:.3f} GB / bandwidth = {3 * logits_bytes / bw * 1e3:.3f} ms",
             "peak_extra_MB: peak bytes allocated during fwd+bwd beyond the logits; beyond_grad_MB: the same "
             "minus the [N, V] gradient (zero for the in-place backward, which reuses the logits)."]
    _common.report("logprobs", rows, device=device, out=args.out, x="shape", y="fwd_bwd_ms",
                   title="gather_logprobs forward+backward", notes=notes)


if __name__ == "__main__":
    main()
