"""Latent decode step: HF eager loop vs HF StaticCache + CUDA graph vs medlvr.

One latent step feeds the previous post-norm hidden state back as the next input
embedding. Providers:
  hf_eager        the decoder (inputs_embeds=h, DynamicCache) per step, as public
                  latent-reasoning code does it (CPU and GPU); the whole generate is
                  medlvr/engine/hf_loop.py
  hf_static_graph the same forward over a StaticCache, one step captured as a CUDA graph
                  (GPU; on CPU "hf_static", the same loop without a graph); for the
                  whole generate the loop of benchmarks/_hf_peers.py (StaticGenerate)
  hf_compile_graph gpt-fast style: the HF decoder under torch.compile(mode=
                  "max-autotune-no-cudagraphs") over a StaticCache, the step captured as a
                  CUDA graph (GPU; on CPU "hf_compile", no graph); first case only unless
                  --compile-all (each shape is a fresh compile); --no-compile skips it
  medlvr_eager    LatentEngine without CUDA graphs (CPU only: the PyTorch references)
  medlvr_nofuse   LatentEngine, K-step segment captured as one CUDA graph (GPU only)
  medlvr          the same with fuse_projections=True: one q/k/v and one gate/up GEMM
                  per layer (GPU only)
Utilisation = bytes a step must read (decoder weights + the batch's K/V) / time /
measured copy bandwidth; floor_ms = those bytes / copy bandwidth.

Full run (GPU): random weights with the real Qwen2.5-VL-7B text config, L = 1024, 4096,
batch 1, 8, 32, bf16, plus one whole generate (prefill 1024 + 8 latent + 64 answer
tokens) side by side. --quick: the embedded tiny config (medlvr/models/assets), fp32,
small L and B, meant for CPU smoke runs; its numbers say nothing about a GPU.

    python benchmarks/bench_latent_step.py            # on an H100
    python benchmarks/bench_latent_step.py --quick    # CPU
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _hf_peers  # noqa: E402
from benchmarks._common import cpu_threads, parser, report, time_ms  # noqa: E402
from medlvr.engine import LatentEngine  # noqa: E402
from medlvr.models import hf  # noqa: E402
from medlvr.engine.hf_loop import latent_loop  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "medlvr" / "models" / "assets" / "config.json"
K_SEGMENT = 8

# Qwen2.5-VL-7B-Instruct's config.json (text part; the vision tower is not in a step).
QWEN25_VL_7B = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, hidden_act="silu",
                     max_position_embeddings=128000, use_sliding_window=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
)


def build_model(quick: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(**json.loads(ASSETS.read_text())) if quick else Qwen2_5_VLConfig(**QWEN25_VL_7B)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    return model.to(dtype).eval()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device=device, warmup=3, iters=10)
    return 2 * n / (ms / 1e3)


def step_bytes(model, B: int, L: int, dtype: torch.dtype) -> int:
    text = model.model.language_model
    weights = sum(p.numel() * p.element_size() for p in text.layers.parameters())
    weights += sum(p.numel() * p.element_size() for p in text.norm.parameters())
    cfg = text.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    kv = B * L * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * elem
    return weights + kv


def _rand_kv(B, L, cfg, device, dtype):
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (B, cfg.num_key_value_heads, L, head_dim)
    return torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)


# ---------------------------------------------------------------- HF eager loop
def hf_eager_step(model, B, L, device, dtype):
    """A step function over a DynamicCache already holding L random positions."""
    from transformers import DynamicCache

    cfg = model.config.text_config
    cache = DynamicCache()
    for i in range(cfg.num_hidden_layers):
        cache.update(*_rand_kv(B, L, cfg, device, dtype), i)
    state = {"h": torch.randn(B, 1, cfg.hidden_size, device=device, dtype=dtype), "pos": L}

    def step():
        pos = torch.full((3, B, 1), state["pos"], device=device, dtype=torch.long)
        state["h"] = hf.run_decoder(model, state["h"], None, pos, cache)[:, -1:]
        state["pos"] += 1

    return step


# ---------------------------------------------------------------- medlvr
def medlvr_segment(engine: LatentEngine, B: int, L: int, device):
    """(segment, reset): a K-step latent segment from a context of L cached positions."""
    engine.prefill({"input_ids": torch.full((B, 4), 10, device=device, dtype=torch.long),
                    "attention_mask": torch.ones(B, 4, device=device, dtype=torch.long)})

    # A synthetic context: every sample at length / position L (the cache contents do
    # not change the work done, only how much of it is read).
    def reset():
        engine.state.seek(L)

    def segment():
        engine.latent_segment(K_SEGMENT)

    return segment, reset


def main() -> None:
    p = parser("latent decode step: HF eager vs HF StaticCache+graph vs medlvr")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick default: 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile (gpt-fast style) peer")
    p.add_argument("--compile-all", action="store_true",
                   help="run the compiled peer at every shape (default: the first case only; each shape is a "
                        "fresh max-autotune compile, minutes on a 7B model)")
    args = p.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    cpu_threads(args, device)
    dtype = torch.float32 if quick else torch.bfloat16
    lengths = [128, 512] if quick else [1024, 4096]
    batches = [1, 4] if quick else [1, 8, 32]
    prefill_len, k_gen, t_gen = (64, 8, 16) if quick else (1024, 8, 64)
    cuda = device.type == "cuda"

    model = build_model(quick, device, dtype)
    bw = copy_bandwidth(device)
    latent_end = 8 if quick else 151666
    max_len = max(max(lengths) + K_SEGMENT + 64, prefill_len + k_gen + t_gen + 1)
    if cuda:
        engines = {"medlvr_nofuse": LatentEngine(model, max_batch=max(batches), max_len=max_len),
                   "medlvr": LatentEngine(model, max_batch=max(batches), max_len=max_len, fuse_projections=True)}
    else:
        engines = {"medlvr_eager": LatentEngine(model, max_batch=max(batches), max_len=max_len,
                                                use_cuda_graphs=False)}
    notes = [f"measured copy bandwidth {bw / 1e9:.1f} GB/s; weights: random, "
             f"{'embedded tiny config, fp32' if quick else 'Qwen2.5-VL-7B text config, bf16'}; "
             f"medlvr times are a {K_SEGMENT}-step segment / {K_SEGMENT}"]
    if quick:
        notes.append("--quick on CPU: a smoke run of the code paths. The CPU path runs the PyTorch references of "
                     f"the kernels; torch threads = {torch.get_num_threads()}. Not indicative of GPU performance.")

    model_notes = list(notes)
    rows = []
    compile_tried = False
    if args.no_compile:
        notes.append("hf_compile_graph: not run (--no-compile)")
    elif not args.compile_all:
        notes.append(f"{'hf_compile_graph' if cuda else 'hf_compile (CPU, no graph)'}: first case only (each shape "
                     "is a fresh max-autotune compile: minutes on a 7B model, ~40 s on this CPU); --compile-all "
                     "runs every case")
    with torch.no_grad():
        for L in lengths:
            for B in batches:
                case = f"L={L} B={B}"
                nbytes = step_bytes(model, B, L, dtype)
                floor = nbytes / bw * 1e3

                def add(provider, ms):
                    rows.append({"case": case, "provider": provider, "ms": ms, "floor_ms": floor,
                                 "util_%": 100 * floor / ms if ms else None})

                step = hf_eager_step(model, B, L, device, dtype)
                add("hf_eager", time_ms(step, device=device, warmup=args.warmup, iters=args.iters))
                del step
                gc.collect()
                for name, engine in engines.items():
                    seg, reset = medlvr_segment(engine, B, L, device)
                    add(name, time_ms(seg, setup=reset, device=device, warmup=args.warmup,
                                      iters=args.iters) / K_SEGMENT)
                # Last: a peer that fails (capture, compile) is named and costs the others nothing.
                hf_peers = [("hf_static_graph" if cuda else "hf_static", {})]
                if not args.no_compile and (args.compile_all or not compile_tried):
                    hf_peers.append(("hf_compile_graph" if cuda else "hf_compile",
                                     {"compile_mode": _hf_peers.GPT_FAST_MODE}))
                    compile_tried = True
                for name, kw in hf_peers:
                    if cuda:
                        torch.cuda.empty_cache()
                    try:
                        step, reset, _ = _hf_peers.static_step(model, B, L, device, dtype, graph=cuda, **kw)
                        add(name, time_ms(step, setup=reset, device=device, warmup=args.warmup, iters=args.iters))
                        del step, reset
                    except Exception as e:  # an HF version whose static path cannot be captured / compiled
                        notes.append(f"{name} {case}: failed ({type(e).__name__}: {str(e)[:160]})")
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()

    report("latent_step", rows, device=device, out=args.out, x="case", y="ms",
           title="latent decode step (ms per step)", notes=notes)

    # One whole generate, side by side: prefill + k_gen latent steps + t_gen answer tokens.
    gen_rows, gen_notes = [], []
    gen_batches = [1] if quick else [1, 8]
    with torch.no_grad():
        for B in gen_batches:
            ids = torch.randint(10, model.config.text_config.vocab_size, (B, prefill_len), device=device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            case = f"prefill {prefill_len} + {k_gen} latent + {t_gen} tokens, B={B}"
            gen_rows.append({"case": case, "provider": "hf_eager", "ms": time_ms(
                lambda: latent_loop(model, batch, k=k_gen, max_new_tokens=t_gen, first_token=latent_end),
                device=device, warmup=1, iters=3)})
            try:
                static = _hf_peers.StaticGenerate(model, batch, k=k_gen, max_new_tokens=t_gen, first_token=latent_end,
                                                  graph=cuda)
                gen_rows.append({"case": case, "provider": "hf_static_graph" if cuda else "hf_static",
                                 "ms": time_ms(static, device=device, warmup=1, iters=3)})
                del static
            except Exception as e:  # an HF version whose static path cannot be captured
                gen_notes.append(f"hf_static_graph generate B={B}: failed ({type(e).__name__}: {str(e)[:160]})")
            for name, eng in engines.items():
                gen_rows.append({"case": case, "provider": name, "ms": time_ms(
                    lambda: eng.generate(batch, k_max=k_gen, max_new_tokens=t_gen, latent_end_id=latent_end),
                    device=device, warmup=1, iters=3)})
    report("latent_generate", gen_rows, device=device, out=args.out, x="case", y="ms",
           title="whole generate (ms)", notes=model_notes + gen_notes + [
               "hf_static_graph: HF StaticCache, prompt prefilled eagerly, every latent and text step replayed "
               "from a CUDA graph (benchmarks/_hf_peers.py StaticGenerate); hf_static on CPU: the same loop, "
               "no graph"])


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.1f} s")
