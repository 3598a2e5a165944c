"""Benchmark: token log-probs through the lm_head (hidden @ W.T -> log-softmax -> gather), forward +
backward to hidden and weight, medlvr's fused op against its peers in one run.

    python benchmarks/bench_fused_logprobs.py                  # CPU: N=512, D=896, V=152064, fp32
    python benchmarks/bench_fused_logprobs.py --warmup 1 --iters 7   # the committed CPU results
    python benchmarks/bench_fused_logprobs.py --device cuda    # GPU: N=8192, D=3584, V=152064, bf16
    python benchmarks/bench_fused_logprobs.py --quick          # small shapes (smoke test, any device)

Every provider computes a scalar from the N per-token log-probs (a weighted sum with fixed
random weights; for the GRPO/VLPO objectives their own loss) and its gradient to hidden and W:
  bare GEMMs          h @ W.T, then G @ W and G.T @ h for a stored (N, V) G, outputs preallocated:
                      the 3 matrix products every provider must do, the denominator of x_gemm
  naive               logits = h @ W.T, log_softmax(logits.float() / T).gather; autograd
  TRL                 TRL's selective_log_softmax over the full logits when trl is importable;
                      else "TRL-style", its documented row-chunked logsumexp (benchmarks/bench_logprobs.py)
  compiled            torch.compile of naive
  medlvr unfused      logits = h @ W.T, medlvr.ops.gather_logprobs(inplace_backward=True)
  Liger FLCE          liger_kernel LigerFusedLinearCrossEntropyLoss(reduction="sum") (CUDA only)
  Liger GRPO          liger_kernel LigerFusedLinearGRPOLoss (CUDA only)
  medlvr fused        medlvr.ops.fused_linear_logprobs then the weighted sum: per-token output (4 GEMMs)
  medlvr fused CE     medlvr.ops.fused_linear_cross_entropy(weights=-w, reduction="sum"): stage 1's
                      answer loss; sum_i w_i CE_i with the weights negated is exactly the weighted
                      sum of log-probs, so objective and gradients are the other rows' (3 GEMMs)
  medlvr fused VLPO   medlvr.ops.fused_vlpo_loss: the VLPO objective (clip, dual clip, k3 KL) against
                      given old log-probs, a later PPO epoch (3 GEMMs)
  medlvr fused VLPO on-policy
                      the same with token_old = latent_old = None: PPO's first epoch, old log-probs =
                      the ones computed in this pass (what the VLPO trainer calls in epoch 0; 3 GEMMs)
  medlvr fused CE C=c the CE row at c rows per chunk (--chunk-sizes; on CUDA 512,1024,2048 by
                      default): where the logits-buffer budget of medlvr/ops/fused_logprobs.py sits

Why 4 GEMMs for `medlvr fused` and 3 for the scalar rows: d W = sum_i g_i (e_{y_i} - p_i) h_i^T
needs each row's full softmax p_i times its upstream gradient g_i = d objective / d logp_i.
fused_linear_logprobs returns the per-token log-probs, so g_i arrives only in the backward; the
forward keeps no logits (that is the point), so the backward must recompute each chunk's logits:
1 GEMM forward + 3 backward. The three scalar rows (fused CE, fused VLPO, fused VLPO on-policy)
know g_i as soon as a chunk's log-probs exist (it depends on row i alone), so the forward does
all 3 GEMMs per chunk and the backward only hands the gradients out (Liger's schedule).

Agreement: before timing, the gradient to hidden of every medlvr row is compared with its
unfused spec through full logits in fp64 (naive for the weighted-sum rows, the reference
fused_vlpo_loss_ref = logits + medlvr.ops.vlpo_loss.vlpo_loss for the VLPO rows) at the
--quick shape (N=64, D=128, V=min(V, 32000)); column dh_err = max |d hidden - spec| / max |spec|.
Columns: median ms forward (no grad) and forward+backward; x_gemm = fwd+bwd / bare GEMMs;
floor_frac = (6 N V D flop at the matrix rate of the fastest large square GEMM of this run) /
fwd+bwd; peak_extra_MB beyond the inputs, and beyond_grads_MB: the same peak not counting the
gradients of hidden and W that every provider returns; mem_vs_naive compares beyond_grads_MB.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from bench_logprobs import chunked as trl_style_logprobs  # noqa: E402

from medlvr._backend import extension, extension_has_cuda  # noqa: E402
from medlvr.ops import (fused_linear_cross_entropy, fused_linear_logprobs, fused_vlpo_loss,  # noqa: E402
                        gather_logprobs)
from medlvr.reference.fused_logprobs import fused_linear_logprobs_ref, fused_vlpo_loss_ref  # noqa: E402

EPS_LOW, EPS_HIGH, DUAL, BETA = 0.2, 0.28, 3.0, 0.04


class NotRunnable(Exception):
    """A peer that cannot run here; the reason goes into the table."""


def _weighted(logp, ctx):
    return (logp * ctx["w"]).sum()


def naive(ctx):
    def f(h, W):
        logits = h @ W.T
        lp = torch.log_softmax(logits.float() / ctx["T"], dim=-1).gather(-1, ctx["t"][:, None]).squeeze(-1)
        return _weighted(lp, ctx)
    return f


def trl(ctx):
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        def f(h, W):
            return _weighted(trl_style_logprobs(h @ W.T, ctx["t"], ctx["T"]), ctx)
        f.label = "TRL-style (trl not installed)"
        return f

    def g(h, W):
        return _weighted(selective_log_softmax((h @ W.T) / ctx["T"], ctx["t"]), ctx)
    return g


def compiled(ctx):
    if ctx["no_compile"]:
        raise NotRunnable("--no-compile")
    return torch.compile(naive(ctx), dynamic=False)


def medlvr_unfused(ctx):
    _need_ext(ctx)

    def f(h, W):
        return _weighted(gather_logprobs(h @ W.T, ctx["t"], temperature=ctx["T"], inplace_backward=True), ctx)
    return f


def _liger(ctx):
    if ctx["device"].type != "cuda":
        raise NotRunnable("liger-kernel needs CUDA (Triton GPU kernels)")
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        raise NotRunnable("liger-kernel not installed (pip install medlvr[bench])")


def liger_flce(ctx):
    _liger(ctx)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if ctx["T"] != 1.0:
        raise NotRunnable("no temperature argument")
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, W: loss(W, h, ctx["t"])


def liger_grpo(ctx):
    _liger(ctx)
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, temperature=ctx["T"],
                                    use_ref_model=True)
    R, n = ctx["R"], ctx["N"] // ctx["R"]
    mask = torch.ones(R, n, dtype=torch.long, device=ctx["device"])

    def f(h, W):
        out = loss(h.view(R, n, -1), W, ctx["t"].view(R, n), mask, ctx["adv"],
                   ref_per_token_logps=ctx["ref"].view(R, n), old_per_token_logps=ctx["old"].view(R, n))
        return out[0] if isinstance(out, tuple) else out
    return f


def _need_ext(ctx):
    if extension() is None:
        raise NotRunnable("medlvr._C not built")
    if ctx["device"].type == "cuda" and not extension_has_cuda():
        raise NotRunnable("medlvr._C built without CUDA")


def medlvr_fused(ctx):
    _need_ext(ctx)
    return lambda h, W: _weighted(fused_linear_logprobs(h, W, ctx["t"], temperature=ctx["T"]), ctx)


def medlvr_fused_ce(ctx):
    _need_ext(ctx)
    # sum_i (-w_i) CE_i = sum_i w_i logp_i: the objective of the other rows with upstream
    # gradient 1, as stage 1's loss.backward() calls it (negating the returned loss instead would
    # add a scaling pass over d W that stage 1 never pays).
    neg_w = -ctx["w"]
    return lambda h, W: fused_linear_cross_entropy(h, W, ctx["t"], weights=neg_w, reduction="sum",
                                                   temperature=ctx["T"], chunk_size=ctx.get("chunk"))


def _vlpo(ctx, op, on_policy):
    """The VLPO objective through ``op`` (fused_vlpo_loss or its reference): old log-probs given
    (a later PPO epoch), or None (on-policy: epoch 0, old = the log-probs computed here)."""
    R, n = ctx["R"], ctx["N"] // ctx["R"]
    mask = torch.ones(R, n, dtype=torch.bool, device=ctx["device"])
    empty = torch.zeros(R, 0, device=ctx["device"])
    old = None if on_policy else ctx["old"].view(R, n)

    def f(h, W):
        loss, _, _ = op(h.view(R, n, -1), W, ctx["t"].view(R, n), mask, old, ctx["adv"],
                        latent_old=None if on_policy else empty, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                        dual_clip=DUAL, latent_coef=0.0, kl_beta=BETA, token_ref=ctx["ref"].view(R, n),
                        temperature=ctx["T"])
        return loss
    return f


def medlvr_fused_vlpo(ctx):
    _need_ext(ctx)
    return _vlpo(ctx, fused_vlpo_loss, on_policy=False)


def medlvr_fused_vlpo_on_policy(ctx):
    _need_ext(ctx)
    return _vlpo(ctx, fused_vlpo_loss, on_policy=True)


PROVIDERS = {"naive": naive, "TRL": trl, "compiled": compiled, "medlvr unfused": medlvr_unfused,
             "Liger FLCE": liger_flce, "Liger GRPO": liger_grpo, "medlvr fused": medlvr_fused,
             "medlvr fused CE": medlvr_fused_ce, "medlvr fused VLPO": medlvr_fused_vlpo,
             "medlvr fused VLPO on-policy": medlvr_fused_vlpo_on_policy}
# The unfused spec of each medlvr row, for the agreement check (default: the weighted sum).
SPECS = {"medlvr fused VLPO": lambda ctx: _vlpo(ctx, fused_vlpo_loss_ref, on_policy=False),
         "medlvr fused VLPO on-policy": lambda ctx: _vlpo(ctx, fused_vlpo_loss_ref, on_policy=True)}


def _weighted_spec(ctx):
    return lambda h, W: _weighted(fused_linear_logprobs_ref(h, W, ctx["t"], temperature=ctx["T"]), ctx)


def make_inputs(N, D, V, dtype, device, T, *, exact_old=True):
    """(ctx, hidden, weight): random inputs; old / reference log-probs near the policy's (so the
    clip is sometimes active), from the full logits unless exact_old is False (GPU shape)."""
    R = 8 if N % 8 == 0 else 1
    g = torch.Generator(device="cpu").manual_seed(0)
    h0 = torch.randn(N, D, generator=g).to(device, dtype)
    W0 = (torch.randn(V, D, generator=g) / D ** 0.5 * 3).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    if exact_old:
        with torch.no_grad():
            lp = torch.log_softmax((h0 @ W0.T).float() / T, -1).gather(-1, t[:, None]).squeeze(-1)
    else:  # avoid the full fp32 logits just to build inputs
        lp = torch.full((N,), -12.0, device=device)
    ctx = dict(device=device, N=N, R=R, T=T, t=t, w=torch.randn(N, generator=g).to(device),
               adv=torch.randn(R, generator=g).to(device),
               old=lp + 0.2 * torch.randn(N, generator=g).to(device), ref=lp + 0.2 * torch.randn(N, generator=g)
               .to(device))
    return ctx, h0, W0


def agreement(names, V, dtype, device, T):
    """{row: max |d hidden - spec's| / max |spec's|} at the --quick shape, the spec in fp64 (the
    reason instead when a row cannot run)."""
    ctx, h0, W0 = make_inputs(64, 128, min(V, 32000), dtype, device, T)
    ctx["no_compile"] = True
    out = {}
    for name in names:
        try:
            fn = PROVIDERS[name](ctx)
            h, W = h0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
            (dh,) = torch.autograd.grad(fn(h, W), (h,))
            h, W = h0.double().requires_grad_(True), W0.double().requires_grad_(True)
            (want,) = torch.autograd.grad(SPECS.get(name, _weighted_spec)(ctx)(h, W), (h,))
            out[name] = ((dh.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        except Exception as e:  # a row that cannot run is named with the reason, never a crash
            out[name] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def square_gemm(device, dtype):
    """(one large square GEMM, its flop): timed in every round, the fastest gives the matrix
    rate of the floor (the best this device showed in this run)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty_like(a)
    return (lambda: torch.mm(a, a, out=out)), 2 * n ** 3


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--v", type=int, default=152064)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--providers", default=None, help="comma-separated subset of: " + ", ".join(PROVIDERS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick default: 1; else torch's)")
    p.add_argument("--chunk-sizes", default=None,
                   help="comma-separated rows per chunk: one extra 'medlvr fused CE C=<rows>' row each, to tune the "
                        "logits-buffer budget (default on CUDA: 512,1024,2048; the plain row uses the op's default)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    _common.cpu_threads(args, device)
    cuda = device.type == "cuda"
    N, D, V = args.n or (8192 if cuda else 512), args.d or (3584 if cuda else 896), args.v
    if args.quick:
        N, D, V = min(N, 64), min(D, 128), min(V, 32000)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    ctx, h0, W0 = make_inputs(N, D, V, dtype, device, args.temperature, exact_old=args.quick or not cuda)
    ctx["no_compile"] = args.no_compile
    h = h0.clone().requires_grad_(True)
    W = W0.clone().requires_grad_(True)
    shape = f"N={N} D={D} V={V} {str(dtype)[6:]}"
    elt = h0.element_size()
    grad_bytes = (N * D + V * D) * elt

    # The bare GEMMs of the same shapes, outputs preallocated: no provider can do less.
    G = torch.randn(N, V, device=device).to(dtype)
    logits_out, dh_out, dw_out = torch.empty(N, V, device=device, dtype=dtype), torch.empty_like(h0), \
        torch.empty_like(W0)

    def bare_fwd():
        torch.mm(h0, W0.T, out=logits_out)

    def bare_all():
        bare_fwd()
        torch.mm(G, W0, out=dh_out)
        torch.mm(G.T, h0, out=dw_out)

    square, square_flop = square_gemm(device, dtype)
    square_ms = []
    timers = {"bare GEMMs": (bare_fwd, bare_all)}
    skipped = []
    names = args.providers.split(",") if args.providers else list(PROVIDERS)
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        p.error(f"--providers: unknown {unknown}; expected names from: {', '.join(PROVIDERS)}")
    errors = agreement([n for n in names if n.startswith("medlvr")], V, dtype, device, args.temperature)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name in names:
        try:
            fn = PROVIDERS[name](ctx)
        except NotRunnable as e:
            skipped.append({"provider": name, "shape": shape, "status": f"not runnable: {e}"})
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(h, W)

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(h, W), (h, W))

        timers[getattr(fn, "label", name)] = (fwd, fwd_bwd)
    chunk_sizes = args.chunk_sizes if args.chunk_sizes is not None else ("512,1024,2048" if cuda else "")
    for c in filter(None, chunk_sizes.split(",")):
        if extension() is None or (cuda and not extension_has_cuda()):
            break
        ce = medlvr_fused_ce({**ctx, "chunk": int(c)})
        timers[f"medlvr fused CE C={c}"] = ((lambda f=ce: torch.no_grad()(f)(h, W)),
                                           (lambda f=ce: torch.autograd.grad(f(h, W), (h, W))))

    # Round robin: every round times each provider once, so a burst of load from other
    # processes on a shared machine hits all of them alike; x_gemm is the median over rounds
    # of (provider / bare GEMMs of the same round).
    samples = {k: ([], []) for k in timers}
    failed = {}
    for r in range(args.warmup + args.iters):
        square_ms.append(_common.time_ms(square, device=device, warmup=0, iters=1))
        for k, (f, fb) in timers.items():
            if k in failed:
                continue
            try:
                ms = (_common.time_ms(f, device=device, warmup=0, iters=1),
                      _common.time_ms(fb, device=device, warmup=0, iters=1))
            except Exception as e:  # a peer that cannot run here is reported, not hidden
                print(f"{k}: failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                failed[k] = f"failed: {type(e).__name__}"
                continue
            if r >= args.warmup:
                samples[k][0].append(ms[0])
                samples[k][1].append(ms[1])
    rate = square_flop / (min(square_ms) * 1e-3)
    floor_ms = 6 * N * V * D / rate * 1e3
    bare = samples["bare GEMMs"][1]
    gemm_ms = statistics.median(bare)
    rows = []
    for k, (f, fb) in timers.items():
        if k in failed:
            rows.append({"provider": k, "shape": shape, "status": failed[k]})
            continue
        ms_f, ms_fb = statistics.median(samples[k][0]), statistics.median(samples[k][1])
        row = {"provider": k, "shape": shape, "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb,
               "x_gemm": statistics.median(a / b for a, b in zip(samples[k][1], bare)), "floor_frac": floor_ms / ms_fb,
               "status": "ok (outputs preallocated)" if k == "bare GEMMs" else "ok"}
        peak, beyond = (0, 0) if k == "bare GEMMs" else _common.peak_beyond_outputs(fb, device=device)
        row.update(peak_extra_MB=peak / 2**20, beyond_grads_MB=beyond / 2**20)
        err = errors.get(k)
        if isinstance(err, float):
            row["dh_err"] = err
            if not err <= tol:
                row["status"] = f"ok, but d hidden differs from its spec by {err:.3g} > {tol:g}"
        elif err is not None:
            row["status"] = f"ok; agreement check failed: {err}"
        rows.append(row)
    rows += skipped
    for r in rows:
        r["status"] = r.pop("status")  # last column
    base = next((r for r in rows if r["provider"] == "naive" and r["status"] == "ok"), None)
    for r in rows:
        if base and "beyond_grads_MB" in r and r["provider"] != "bare GEMMs":
            r["mem_vs_naive"] = r["beyond_grads_MB"] / max(base["beyond_grads_MB"], 1e-9)
    notes = [f"matrix rate measured in this run (fastest of {len(square_ms)} square {str(dtype)[6:]} GEMMs, one per "
             f"round): {rate / 1e9:.1f} GFLOP/s; "
             f"floor = 6 N V D / rate = {floor_ms:.1f} ms; bare GEMMs {gemm_ms:.1f} ms (median of "
             f"{len(bare)} rounds; every round times each provider once, x_gemm is the median of the "
             f"per-round ratios).",
             f"beyond_grads_MB: the peak not counting the returned d hidden and d W ({grad_bytes / 2**20:.1f} MB in "
             f"{str(dtype)[6:]}) while they exist" + (" (CUDA: peak minus their bytes, a lower bound)." if cuda else
                                                      ", from the allocator's timeline (benchmarks/_common.py)."),
             "medlvr fused: per-token output, whose upstream gradient arrives only in the backward, so the "
             "backward recomputes each chunk's logits (4 GEMMs); medlvr fused CE / fused VLPO / fused VLPO "
             "on-policy: scalar objectives, gradients computed in the forward chunk by chunk (3 GEMMs).",
             f"dh_err: max |d hidden - its unfused spec's (fp64, full logits)| / max |spec's| at N=64 D=128 "
             f"V={min(V, 32000)} {str(dtype)[6:]}, checked before timing (tolerance {tol:g})."]
    name = "fused_logprobs" + ("-quick" if args.quick else "")
    _common.report(name, rows, device=device, out=args.out, x="shape", y="fwd_bwd_ms",
                   title="lm_head + token log-probs, forward+backward", notes=notes)


if __name__ == "__main__":
    main()
