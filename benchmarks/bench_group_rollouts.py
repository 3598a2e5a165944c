"""Group rollouts (GRPO / VLPO): P prompts x G answers each, side by side.

Providers (one whole rollout batch each: prefill + K latent steps + T answer tokens,
sampled at temperature 1 with latent noise):
  medlvr_grouped  LatentEngine.generate(group_size=G): each prompt prefilled once, its K/V
                  kept once and shared by its G rows (cascade attention,
                  medlvr/engine/group.py); the rows' own cache holds K + T positions
  medlvr_rows     the same engine on the prompts repeated G times: P * G independent rows,
                  P * G prefills and prompt caches (what VLPO ran before grouping)
  hf_generate     HF ``generate(num_return_sequences=G, do_sample=True)``: the HF peer is
                  plain text generation of K + T tokens (HF has no latent feedback loop),
                  its own DynamicCache, prompt expanded G times
rollouts/s = P * G / time; memory = the engine's preallocated caches + the peak extra
allocation of one call (HF: the peak extra allocation, its cache included);
speedup = rollouts/s over medlvr_rows.

Full run (GPU): random weights with the Qwen2.5-VL-7B text config, bf16, 8 prompts x
G = 8, prefill 1024 + 8 latent + 64 tokens. --quick: the embedded tiny config, fp32, 2
prompts x G = 4, prefill 64 + 4 latent + 8 tokens, on CPU; a smoke run whose numbers say
nothing about a GPU.

    python benchmarks/bench_group_rollouts.py            # on an H100 / H200
    python benchmarks/bench_group_rollouts.py --quick    # CPU
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import cpu_threads, parser, peak_extra_bytes, report, time_ms  # noqa: E402
from benchmarks.bench_latent_step import build_model  # noqa: E402
from medlvr.engine import LatentEngine  # noqa: E402


def main() -> None:
    p = parser("group rollouts: grouped prefix sharing vs independent rows vs HF generate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick default: 1)")
    args = p.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    cpu_threads(args, device)
    dtype = torch.float32 if quick else torch.bfloat16
    P, G, S, K, T = (2, 4, 64, 4, 8) if quick else (8, 8, 1024, 8, 64)
    latent_end = 8 if quick else 151666
    model = build_model(quick, device, dtype)
    V = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (P, S), generator=g).to(device)
    prompts = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    repeated = {k: v.repeat_interleave(G, 0) for k, v in prompts.items()}
    kw = dict(k_max=K, max_new_tokens=T, latent_end_id=latent_end, temperature=1.0, latent_noise_std=0.1)
    case = f"{P} prompts x G={G}, prefill {S} + {K} latent + {T} tokens"
    notes = [f"weights: random, {'embedded tiny config, fp32' if quick else 'Qwen2.5-VL-7B text config, bf16'}; "
             "hf_generate is plain text generation of K + T sampled tokens (no latent loop in HF)"]
    if quick:
        notes.append("--quick on CPU: a smoke run of the code paths (PyTorch references of the kernels, torch "
                     f"threads = {torch.get_num_threads()}). Not indicative of GPU performance.")

    def seeded(fn):
        gen = torch.Generator(device=device)
        return lambda: fn(gen.manual_seed(0))

    providers = {}
    grouped = LatentEngine(model, max_batch=P * G, max_len=K + T, max_prompts=P, max_prompt_len=S)
    providers["medlvr_grouped"] = (seeded(lambda gen: grouped.generate(prompts, group_size=G, generator=gen, **kw)),
                                   grouped.cache.nbytes + grouped.prefix.nbytes)
    rows = LatentEngine(model, max_batch=P * G, max_len=S + K + T)
    providers["medlvr_rows"] = (seeded(lambda gen: rows.generate(repeated, generator=gen, **kw)), rows.cache.nbytes)

    def hf_generate(gen):
        torch.manual_seed(0)  # HF samples from the global generator
        return model.generate(**prompts, do_sample=True, num_return_sequences=G, max_new_tokens=K + T,
                              min_new_tokens=K + T, pad_token_id=0, top_k=0, top_p=1.0, temperature=1.0)
    providers["hf_generate"] = (seeded(hf_generate), 0)

    results = []
    with torch.no_grad():
        for name, (fn, static_bytes) in providers.items():
            try:
                ms = time_ms(fn, device=device, warmup=min(args.warmup, 1), iters=min(args.iters, 3))
                mem = static_bytes + peak_extra_bytes(fn, device=device)
            except Exception as e:  # a peer that cannot run is named, never fatal
                notes.append(f"{name}: failed ({type(e).__name__}: {str(e)[:160]})")
                continue
            results.append({"case": case, "provider": name, "ms": ms, "rollouts/s": P * G / (ms / 1e3),
                            "memory_MB": mem / 2 ** 20})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = next((r["rollouts/s"] for r in results if r["provider"] == "medlvr_rows"), None)
    for r in results:
        r["speedup_vs_rows"] = r["rollouts/s"] / base if base else None
    report("group_rollouts", results, device=device, out=args.out, x="case", y="rollouts/s",
           title="group rollouts (rollouts/s)", notes=notes)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.1f} s")
