"""Per-step kernels of the latent decode engine vs naive PyTorch (and SDPA, and for
add_rmsnorm the unfused pair it replaces: a torch add, then the rmsnorm kernel).

    python benchmarks/bench_decode_kernels.py            # Qwen2.5-VL-7B shapes, CUDA
    python benchmarks/bench_decode_kernels.py --quick    # small shapes (any device)

Every kernel here is memory-bound, so each row reports the bytes the op must move
(read + write, the floor), the achieved GB/s and the fraction of the copy bandwidth
measured in the same run (a large device-to-device tensor copy): 1.0 = at the HBM floor.
Shapes: Hq=28, Hkv=4, Dh=128, D=3584 (Qwen2.5-VL-7B), B in {1, 8, 32}, cache length L in
{1024, 4096}, all samples full (lengths = L, the worst case for attention), bf16 on CUDA.

On CPU the Triton kernels would run in the interpreter (timing it is meaningless), so
only the PyTorch providers run there and the table says so; their fraction of the copy
bandwidth is still a fair statement about those providers on this CPU.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import parser, report, time_ms  # noqa: E402
from medlvr.ops import decode as ops  # noqa: E402


# ------------------------------------------------------------------ naive providers
# What an engine without these kernels does, written the way transformers does it.
def naive_rotary(q, k, v, *, positions, inv_freq, mrope_section, k_cache, v_cache, slots):
    freqs = positions[..., None].float() * inv_freq  # (3, B, half)
    freqs = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype)[:, None], emb.sin().to(q.dtype)[:, None]

    def rot(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    rows = torch.arange(q.shape[0], device=q.device)
    k_cache[rows, :, slots] = rot(k)
    v_cache[rows, :, slots] = v
    return rot(q)


def naive_attention(q, k_cache, v_cache, lengths):
    # HF eager: repeat_kv, bf16 matmul, additive mask, fp32 softmax, bf16 matmul.
    B, Hq, Dh = q.shape
    group = Hq // k_cache.shape[1]
    k = k_cache[:B].repeat_interleave(group, dim=1)
    v = v_cache[:B].repeat_interleave(group, dim=1)
    s = torch.matmul(q[:, :, None], k.transpose(-1, -2)) * Dh ** -0.5  # (B, Hq, 1, L)
    valid = torch.arange(k.shape[2], device=q.device) < lengths[:, None]
    s = s.masked_fill(~valid[:, None, None], float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, v)[:, :, 0]


def sdpa_attention(q, k_cache, v_cache, lengths):
    B, Hq, _ = q.shape
    valid = torch.arange(k_cache.shape[2], device=q.device) < lengths[:, None]
    return F.scaled_dot_product_attention(q[:, :, None], k_cache[:B], v_cache[:B], attn_mask=valid[:, None, None],
                                          enable_gqa=Hq != k_cache.shape[1])[:, :, 0]


def naive_rmsnorm(hidden, weight, eps, out):
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out.copy_(weight * h.to(hidden.dtype))
    return out


def naive_add_rmsnorm(x, residual, weight, eps):
    # HF decoder layer: `hidden = residual + hidden`, then the next RMSNorm
    hidden = residual + x
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(hidden.dtype), hidden


def unfused_pair(x, residual, weight, eps, buf):
    # medlvr's step before add_rmsnorm: a torch add, then the rmsnorm kernel
    hidden = residual + x
    return ops.rmsnorm_feedback(hidden, weight, eps=eps, out=buf), hidden


def _compiled(fn, enabled):
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001  (a missing compiler must not kill the benchmark)
        return None


# ------------------------------------------------------------------ measurement
# ------------------------------------------------------------------ library peers
def external_attention_peers(device, dtype, notes):
    """Decode-attention peers from libraries, when importable on this device: a dict
    name -> make(q, k_cache, v_cache, lengths) -> step function. Each converts the
    (B, Hkv, L, Dh) cache to its own native layout once, outside the timed step. A peer
    that cannot run is named in ``notes`` with the reason."""
    peers = {}
    if device.type != "cuda":
        notes.append("flash_attn_with_kvcache, FlashInfer decode: not run (CUDA only).")
        return peers
    try:
        from flash_attn import flash_attn_with_kvcache

        def make_fa(q, k_cache, v_cache, lengths):
            kc, vc = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()  # (B, L, Hkv, Dh)
            q4, seqlens = q[:, None], lengths.to(torch.int32)
            return lambda: flash_attn_with_kvcache(q4, kc, vc, cache_seqlens=seqlens)
        peers["flash_attn_with_kvcache"] = make_fa
    except Exception as e:  # not installed / no build for this GPU
        notes.append(f"flash_attn_with_kvcache: not run ({type(e).__name__}: {str(e)[:120]})")
    try:
        import flashinfer

        def make_fi(q, k_cache, v_cache, lengths):
            # One page per sample of page_size = L (NHD layout): the cache as FlashInfer
            # stores it, every sample at full length as in this benchmark.
            B, Hkv, L, Dh = k_cache.shape
            kv = torch.stack([k_cache.transpose(1, 2), v_cache.transpose(1, 2)], dim=1).contiguous()
            ws = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            idx = torch.arange(B + 1, dtype=torch.int32, device=q.device)
            last = lengths.to(torch.int32)
            w.plan(idx, idx[:-1], last, q.shape[1], Hkv, Dh, L, data_type=q.dtype)
            return lambda: w.run(q, kv)
        peers["flashinfer decode (paged)"] = make_fi
    except Exception as e:
        notes.append(f"FlashInfer decode: not run ({type(e).__name__}: {str(e)[:120]})")
    return peers


def copy_bandwidth(device, args) -> float:
    """GB/s of a large device copy (read + write), the practical HBM/DRAM floor."""
    nbytes = 1 << 28 if device.type == "cuda" else 1 << 25  # 256 MB on a GPU (>> L2), 32 MB on CPU
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device=device, warmup=args.warmup, iters=args.iters)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _row(op, shape, provider, ms, nbytes, bw):
    gbs = nbytes / (ms * 1e-3) / 1e9 if ms else float("nan")
    return {"case": f"{op} {shape}", "op": op, "shape": shape, "provider": provider, "ms": ms, "MB moved": nbytes / 1e6,
            "GB/s": gbs, "frac of copy bw": gbs / bw}


def _time(fn, device, args):
    return time_ms(fn, device=device, warmup=args.warmup, iters=args.iters)


def bench_case(B, L, *, Hq, Hkv, Dh, D, dtype, device, args, bw, use_triton, use_compile, peers=None,
               notes=None):
    rows = []
    es = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = f"B={B} L={L}"

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype=dtype, device=device)

    # ---- rotary + append (mRoPE, every sample writes at slot L-1)
    q, k, v = rnd(B, Hq, Dh), rnd(B, Hkv, Dh), rnd(B, Hkv, Dh)
    k_cache, v_cache = rnd(B, Hkv, L, Dh), rnd(B, Hkv, L, Dh)
    positions = torch.full((3, B), L - 1, dtype=torch.long, device=device)
    slots = torch.full((B,), L - 1, dtype=torch.long, device=device)
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh))).to(device)
    sec = (16, 24, 24) if Dh == 128 else (Dh // 2 - 2 * (Dh // 6), Dh // 6, Dh // 6)
    kw = dict(positions=positions, inv_freq=inv_freq, mrope_section=sec, k_cache=k_cache, v_cache=v_cache,
              slots=slots)
    nbytes = 2 * B * (Hq + 2 * Hkv) * Dh * es  # read q, k, v; write q_rot and one cache row each
    rows.append(_row("rotary_append", shape, "naive torch (HF ops)", _time(lambda: naive_rotary(q, k, v, **kw),
                                                                             device, args), nbytes, bw))
    comp = _compiled(naive_rotary, use_compile)
    if comp is not None:
        rows.append(_row("rotary_append", shape, "torch.compile(naive)", _time(lambda: comp(q, k, v, **kw),
                                                                                device, args), nbytes, bw))
    if use_triton:
        rows.append(_row("rotary_append", shape, "medlvr triton",
                         _time(lambda: ops.rotary_append(q, k, v, **kw), device, args), nbytes, bw))
    else:
        rows.append(_row("rotary_append", shape, "medlvr reference (CPU fallback)",
                         _time(lambda: ops.rotary_append(q, k, v, **kw), device, args), nbytes, bw))

    # ---- decode attention over full caches
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    nbytes = 2 * B * Hkv * L * Dh * es + 2 * B * Hq * Dh * es  # K + V once per kv head, q in, out
    for name, fn in (("naive torch (HF eager)", naive_attention), ("sdpa (bool mask, enable_gqa)", sdpa_attention)):
        rows.append(_row("decode_attention", shape, name, _time(lambda fn=fn: fn(q, k_cache, v_cache, lengths),
                                                                device, args), nbytes, bw))
    comp = _compiled(naive_attention, use_compile)
    if comp is not None:
        rows.append(_row("decode_attention", shape, "torch.compile(naive)",
                         _time(lambda: comp(q, k_cache, v_cache, lengths), device, args), nbytes, bw))
    for name, make in (peers or {}).items():
        try:
            fn = make(q, k_cache, v_cache, lengths)
            rows.append(_row("decode_attention", shape, name, _time(fn, device, args), nbytes, bw))
        except Exception as e:  # a peer that fails at this shape is named, never fatal
            notes.append(f"{name} {shape}: failed ({type(e).__name__}: {str(e)[:120]})")
    if use_triton:
        rows.append(_row("decode_attention", shape, "medlvr triton",
                         _time(lambda: ops.decode_attention(q, k_cache, v_cache, lengths, out=out), device, args),
                         nbytes, bw))
    else:
        rows.append(_row("decode_attention", shape, "medlvr reference (CPU fallback, fp32)",
                         _time(lambda: ops.decode_attention(q, k_cache, v_cache, lengths, out=out), device, args),
                         nbytes, bw))
    k_cache = v_cache = None  # the caches are freed before the next phase allocates

    # ---- final norm + feedback into the input buffer
    hidden, weight = rnd(B, D), rnd(D)
    buf = torch.empty_like(hidden)
    nbytes = 2 * B * D * es + D * es
    rows.append(_row("rmsnorm_feedback", shape, "naive torch (HF RMSNorm + copy)",
                     _time(lambda: naive_rmsnorm(hidden, weight, 1e-6, buf), device, args), nbytes, bw))
    comp = _compiled(naive_rmsnorm, use_compile)
    if comp is not None:
        rows.append(_row("rmsnorm_feedback", shape, "torch.compile(naive)",
                         _time(lambda: comp(hidden, weight, 1e-6, buf), device, args), nbytes, bw))
    label = "medlvr triton" if use_triton else "medlvr reference (CPU fallback)"
    rows.append(_row("rmsnorm_feedback", shape, label,
                     _time(lambda: ops.rmsnorm_feedback(hidden, weight, eps=1e-6, out=buf), device, args), nbytes, bw))

    # ---- a layer's residual add + the next RMSNorm: read x, residual; write normed, new residual
    x = rnd(B, D)
    nbytes = 4 * B * D * es + D * es
    rows.append(_row("add_rmsnorm", shape, "naive torch (add + HF RMSNorm)",
                     _time(lambda: naive_add_rmsnorm(x, hidden, weight, 1e-6), device, args), nbytes, bw))
    comp = _compiled(naive_add_rmsnorm, use_compile)
    if comp is not None:
        rows.append(_row("add_rmsnorm", shape, "torch.compile(naive)",
                         _time(lambda: comp(x, hidden, weight, 1e-6), device, args), nbytes, bw))
    pair = "medlvr unfused (torch add + rmsnorm kernel)" if use_triton else "medlvr unfused (add + reference norm)"
    rows.append(_row("add_rmsnorm", shape, pair,
                     _time(lambda: unfused_pair(x, hidden, weight, 1e-6, buf), device, args), nbytes, bw))
    rows.append(_row("add_rmsnorm", shape, label,
                     _time(lambda: ops.add_rmsnorm(x, hidden, weight, eps=1e-6), device, args), nbytes, bw))
    return rows


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are not representative)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default on CPU: 1; with 2 threads on a loaded shared machine every "
                        "small op waits ~25 ms on OpenMP barriers, which measures the machine, not the op)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    Hq, Hkv, Dh, D = 28, 4, 128, 3584
    cases = [(1, 256), (4, 256)] if args.quick else [(b, l) for l in (1024, 4096) for b in (1, 8, 32)]
    # torch.compile on CPU needs a C++ toolchain and minutes per shape: CUDA only by default.
    use_compile = on_cuda and not args.no_compile
    bw = copy_bandwidth(device, args)
    rows, peer_notes = [], []
    peers = external_attention_peers(device, dtype, peer_notes)
    with torch.inference_mode():
        for B, L in cases:
            rows += bench_case(B, L, Hq=Hq, Hkv=Hkv, Dh=Dh, D=D, dtype=dtype, device=device, args=args, bw=bw,
                               use_triton=on_cuda, use_compile=use_compile, peers=peers, notes=peer_notes)
    for r in rows:
        r["dtype"] = str(dtype).replace("torch.", "")
    notes = [f"Copy bandwidth measured in this run: {bw:.1f} GB/s (read + write of a large tensor copy).",
             "MB moved = bytes the op must read + write at minimum; frac of copy bw = (MB moved / time) / copy bw.",
             f"Shapes: Hq={Hq}, Hkv={Hkv}, Dh={Dh}, D={D} (Qwen2.5-VL-7B), all samples at full length L."]
    notes += peer_notes
    if not on_cuda:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        notes.append(f"CPU load average (1 min) at the end of the run: {load:.1f} on {os.cpu_count()} cores "
                     "(a shared machine: CPU times are noisy).")
        notes.append("On CPU a fraction above 1 means the op's working set sat in the CPU caches, while the "
                     "32 MB copy that defines the floor does not.")
        notes.append("CPU run: the Triton kernels were NOT timed (they only run in the slow interpreter here); "
                     "'medlvr reference (CPU fallback)' is the plain-PyTorch path the ops dispatch to on CPU.")
    name = "decode_kernels" + ("-quick" if args.quick else "")
    report(name, rows, device=device, out=args.out, x="case", y="frac of copy bw",
           group="provider", title="decode-step kernels", notes=notes)


if __name__ == "__main__":
    main()
