"""Drop-in presets: each system's original-style loop vs medlvr on the same prompts.

Providers, per preset and batch size:
  original  the system's loop as its public code runs it (medlvr/reference/dropin_loops.py):
            Coconut: one pass per latent on a KV cache, then every answer token re-runs the
            whole sequence without a cache, batch 1 (at batch 16, one loop per row, as its
            generate asserts batch 1); LVR (decoding_strategy="steps", its evaluation's), Monet
            (its vLLM runner's logic) and Mirage (batch-global exit): the batch together, one
            HF DynamicCache step per token, host-side mode bookkeeping per step.
  medlvr    ``medlvr.generate(model, inputs, spec=LatentSpec.preset(name))``: the tokenizer-
            style batch in, the engine (static KV cache, CUDA graphs on a GPU) underneath;
            the time includes cutting / re-padding the prompts. The engine is built during
            warmup and cached per model, as it is for a user calling generate repeatedly.

Every row decodes the same work on both sides: no eos (each row writes max_new_tokens),
the presets' step budgets (Coconut: the prompt's <|latent|> count; LVR 6 fixed steps). With
random weights and lm_head's start / end / pad rows zeroed (their logits are 0, under the
largest random logit) the end-token rules do not fire, so each row runs its full budget; the exits
themselves are checked in tests/dropin/test_presets.py. Each run compares medlvr's latents and tokens with
the original's (max |difference| of the latents, rows whose tokens / latent counts differ)
and reports a mismatch in the table instead of stopping.

Full run (GPU, bf16): the Qwen2.5-VL-7B text config (benchmarks/bench_latent_step.py) and
GPT-2 124M for Coconut, random weights, batch 1 and 16. --quick: tiny configs, fp32, CPU;
its numbers say nothing about a GPU.

    python benchmarks/bench_dropin.py --device cuda
    python benchmarks/bench_dropin.py --quick
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import medlvr  # noqa: E402
from benchmarks._common import cpu_threads, parser, peak_extra_bytes, report, time_ms  # noqa: E402
from benchmarks.bench_latent_step import build_model as build_qwen  # noqa: E402
from medlvr.dropin import LatentSpec  # noqa: E402
from medlvr.reference import dropin_loops  # noqa: E402

QWEN_PRESETS = ("lvr-steps", "monet", "mirage")
BATCHES = (1, 16)
NO_EOS = -1  # no id equals it: every row decodes max_new_tokens on both sides


def build_gpt2(quick: bool, device: torch.device, dtype: torch.dtype):
    """GPT-2 124M (HF's default GPT2Config) with Coconut's three added tokens, or a tiny one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = (GPT2Config(vocab_size=1024, n_embd=128, n_layer=3, n_head=4, n_positions=256) if quick
           else GPT2Config(vocab_size=50257 + 3))
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def sizes(quick: bool) -> dict:
    # Qwen: the start/end/pad ids are Monet's and Mirage's (151666/151667/151665), used for
    # every Qwen preset so the prompts are shared and no tokenizer is needed; GPT-2: the
    # three ids Coconut appends.
    if quick:
        return dict(qwen_prompt=24, gpt2_prompt=16, spread=8, latents=6, tokens=8, text_hi=1024,
                    qwen_ids=(7, 8, 9), gpt2_ids=(7, 8, 9))
    return dict(qwen_prompt=256, gpt2_prompt=128, spread=64, latents=6, tokens=32, text_hi=50257,
                qwen_ids=(151666, 151667, 151665), gpt2_ids=(50257, 50258, 50259))


def prompts(n: int, length: int, spread: int, text_hi: int, tail: list[int], device, seed: int = 0):
    """n ragged prompts (lengths length - (7i mod spread)) of random text ids, then ``tail``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        text = torch.randint(10, text_hi, (length - (7 * i) % spread,), generator=g)
        rows.append(torch.cat([text, torch.tensor(tail)]).to(device))
    return rows


def padded(rows, *, left: bool) -> dict:
    """The tokenizer's batch: Qwen's processor pads on the left, GPT-2's tokenizer on the right."""
    S = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(S - r.numel(), S) if left else slice(0, r.numel())
        ids[b, sl], mask[b, sl] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def original_fn(preset, model, rows, k, T, ids):
    """A callable running the original loop on ``rows``; returns [(latents (n, D), answer tokens)].
    Coconut's generate runs batch 1 (one loop per row); LVR's and Mirage's patched HF
    ``_sample`` and Monet's vLLM runner run the batch together. Their token budgets count
    the latent placeholders (medlvr/reference/dropin_loops.py), so each gets k + T (+ the
    forced end token) to write T answer tokens."""
    if preset == "coconut":
        def per_row():
            res = [dropin_loops.coconut(model, r, latent_id=ids[2], eos=NO_EOS, max_new_tokens=T) for r in rows]
            return [(o.latents[0], o.after[0]) for o in res]
        return per_row
    start, end = ids[:2]
    batch = padded(rows, left=True)
    if preset == "lvr-steps":
        run = lambda: dropin_loops.lvr(model, batch, strategy="steps", start_id=start, end_id=end,  # noqa: E731
                                       eos=NO_EOS, max_new_tokens=k + T, steps=k)
        skip = 0  # the model's own token follows the latents: it is the first answer token
    elif preset == "monet":
        run = lambda: dropin_loops.monet(model, batch, start_id=start, end_id=end, latent_size=k,  # noqa: E731
                                         eos=NO_EOS, max_new_tokens=k + T + 1)
        skip = 1  # the forced end token
    else:
        run = lambda: dropin_loops.mirage(model, batch, start_id=start, end_id=end, latent_pad_id=ids[2],  # noqa: E731
                                          eos=NO_EOS, max_new_tokens=k + T + 1, max_latent_len=k)
        skip = 1

    def together():
        res = run()
        return [(lat, after[skip:]) for lat, after in zip(res.latents, res.after)]
    return together


def medlvr_fn(model, rows, spec, T, left):
    batch = padded(rows, left=left)

    def run():
        out = medlvr.generate(model, batch, spec=spec, max_new_tokens=T, stop_ids=[])
        n, t = out.num_latent.tolist(), out.text_lengths.tolist()
        return [(out.latents[b, :n[b]], out.tokens[b, :t[b]].tolist()) for b in range(len(rows))]
    return run


def compare(ours, theirs) -> dict:
    """max |latent difference| over rows with equal counts, and rows that differ."""
    diff, tok_rows, count_rows = 0.0, 0, 0
    for (la, ta), (lb, tb) in zip(ours, theirs):
        if la.shape != lb.shape:
            count_rows += 1
        elif la.numel():
            diff = max(diff, float((la.float() - lb.float()).abs().max()))
        tok_rows += ta != tb
    return {"max_latent_diff": diff, "token_rows_differ": tok_rows, "count_rows_differ": count_rows}


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def bench_model(model, presets, *, quick, device, args, rows_out, notes):
    sz = sizes(quick)
    cuda = device.type == "cuda"
    wbytes = weights_bytes(model)
    for B in BATCHES:
        for preset in presets:
            case = f"{preset} B={B}"
            if preset == "coconut":
                start, end, lat = sz["gpt2_ids"]
                rows = prompts(B, sz["gpt2_prompt"], sz["spread"] // 2, sz["text_hi"],
                               [start] + [lat] * sz["latents"] + [end], device)
                spec = LatentSpec.preset("coconut", start_token=start, end_token=end, latent_token=lat)
                k, ids, left = sz["latents"], sz["gpt2_ids"], False
            else:
                start, end, pad = sz["qwen_ids"]
                rows = prompts(B, sz["qwen_prompt"], sz["spread"], sz["text_hi"], [start], device)
                extra = {"latent_pad_token": pad} if preset == "mirage" else {}
                spec = LatentSpec.preset(preset, start_token=start, end_token=end, **extra)
                if preset == "lvr-steps":
                    spec = spec.replace(max_steps=sz["latents"])
                k, ids, left = spec.max_steps, sz["qwen_ids"], True
            fns = {"original": original_fn(preset, model, rows, k, sz["tokens"], ids),
                   "medlvr": medlvr_fn(model, rows, spec, sz["tokens"], left)}
            results, outs = {}, {}
            for name, fn in fns.items():
                try:
                    with torch.no_grad():
                        outs[name] = fn()
                        ms = time_ms(fn, device=device, warmup=args.warmup, iters=args.iters)
                        peak = peak_extra_bytes(fn, device=device)
                    gc.collect()
                    # medlvr's engine outlives the call (cached per model); the original loops keep nothing,
                    # and on their rows this figure would count the engine of an earlier case.
                    held = None
                    if cuda and name == "medlvr":
                        held = (torch.cuda.memory_allocated(device) - wbytes) / 2**20
                    n_lat = sum(int(o[0].shape[0]) for o in outs[name])
                    n_tok = sum(len(o[1]) for o in outs[name])
                    results[name] = {"case": case, "provider": name, "ms": ms, "latents/s": n_lat / (ms / 1e3),
                                     "tokens/s": n_tok / (ms / 1e3), "peak_MB": peak / 2**20,
                                     "held_MB": "" if held is None else max(held, 0.0)}
                except Exception as e:  # a provider that cannot run is named, the others still run
                    notes.append(f"{case} {name}: failed ({type(e).__name__}: {str(e)[:200]})")
            if "original" in results and "medlvr" in results:
                results["medlvr"]["speedup"] = results["original"]["ms"] / results["medlvr"]["ms"]
                check = compare(outs["medlvr"], outs["original"])
                results["medlvr"].update(check)
                ok = check["token_rows_differ"] == 0 and check["count_rows_differ"] == 0
                print(f"[check] {case}: max |latent diff| {check['max_latent_diff']:.3g}, rows with other tokens "
                      f"{check['token_rows_differ']}, other latent counts {check['count_rows_differ']}"
                      f"{'' if ok else '  MISMATCH'}", flush=True)
                if not ok or (quick and check["max_latent_diff"] > 1e-3):
                    notes.append(f"MISMATCH {case}: {check}")
            rows_out.extend(results.values())
            print(f"[done] {case}: " + ", ".join(f"{n} {r['ms']:.1f} ms" for n, r in results.items()), flush=True)


def main() -> None:
    p = parser("drop-in presets: original-style loops vs medlvr.generate")
    p.set_defaults(warmup=1, iters=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick default: 1)")
    p.add_argument("--presets", default="coconut,lvr-steps,monet,mirage", help="comma-separated subset")
    args = p.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    cpu_threads(args, device)
    dtype = torch.float32 if quick or device.type == "cpu" else torch.bfloat16
    chosen = [s for s in args.presets.split(",") if s]
    rows, notes = [], []
    sz = sizes(quick)
    if "coconut" in chosen:
        model = build_gpt2(quick, device, dtype)
        bench_model(model, ["coconut"], quick=quick, device=device, args=args, rows_out=rows, notes=notes)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    qwen = [s for s in chosen if s in QWEN_PRESETS]
    if qwen:
        model = build_qwen(quick, device, dtype)
        # Zero lm_head's start / end / pad rows: their logits are 0, below the largest of the
        # other (random, centred) logits in practice, so no row samples <start> again (a second
        # segment, which medlvr does not run) and every row runs its full latent budget.
        with torch.no_grad():
            model.lm_head.weight[list(sz["qwen_ids"])] = 0
        bench_model(model, qwen, quick=quick, device=device, args=args, rows_out=rows, notes=notes)

    configs = "tiny GPT-2 / Qwen2.5-VL configs" if quick else "GPT-2 124M / Qwen2.5-VL-7B text config"
    notes = [
        f"random weights, {dtype}; {configs}; prompts: Coconut {sz['gpt2_prompt']}-token question (ragged) + "
        f"{sz['latents']} <|latent|>, "
        f"Qwen {sz['qwen_prompt']} tokens (ragged, text only) ending with the start token; latent steps per row: "
        f"the preset's budget (lvr-steps {sz['latents']}, monet 10, mirage 8; coconut the placeholder count); "
        f"{sz['tokens']} answer tokens per row, no eos. ms = one generate over the whole batch (median); original "
        "at B=16: 16 batch-1 loops for Coconut (its generate asserts batch 1), one batched loop for the others.",
        "peak_MB: peak memory allocated during one warm call beyond what was live before it (benchmarks/_common.py); "
        "held_MB (GPU, medlvr rows): memory held between calls beyond the weights (the cached engine: static KV "
        "cache and graph pools; the original loops hold none). speedup = original ms / medlvr ms. "
        "max_latent_diff / *_rows_differ: medlvr's output against the original's on the same prompts.",
    ] + notes
    if quick:
        notes.append(f"--quick on CPU: torch threads = {torch.get_num_threads()}; the engine runs the PyTorch "
                     "references of the kernels and no CUDA graphs. Not indicative of GPU performance.")
    report("dropin-quick" if quick else "dropin", rows, device=device, out=args.out, x="case", y="ms",
           title="drop-in presets: original loop vs medlvr (ms per generate)", notes=notes)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.1f} s")
