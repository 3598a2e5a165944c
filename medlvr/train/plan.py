"""``medlvr plan``: per-GPU memory of stage 1 and VLPO for a Qwen2.5-VL config, by parallel mode.

Everything is counted from the config's numbers (no model is built), one parameter at a
time, the way the run allocates it:

- weights are fp32 (``medlvr sft`` loads the model in fp32: the master weights), LoRA's A/B,
  the latent-token rows and the projector too; the optimizer is AdamW: two fp32 states per
  trainable weight (plus a 4-byte step each);
- FSDP2 (medlvr/policy/fsdp.py) keeps on each of N ranks a dim-0 slice of every parameter,
  padded to ceil(rows / N) rows (fully_shard's layout), its gradient and its Adam states
  likewise; it gathers one unit at a time in bf16 (two in flight: the current and the
  prefetched one), and reduce-scatters that unit's gradient from fp32;
- DDP keeps everything whole on every rank, and its reducer holds a second copy of the
  trainable gradients (its buckets; torch's DDP ``gradient_as_bucket_view=False``);
- activations (bf16 autocast, no recomputation) are the tensors autograd keeps per token
  and decoder layer, counted for Qwen2's layer (see :func:`activation_bytes`); the fused
  lm_head loss adds one (C, V) logits chunk of 256 MiB (medlvr/ops/fused_logprobs.py);
- VLPO adds the reference policy (``--reference``: "copy", a frozen fp32 copy of the model,
  sharded like the weights under FSDP, which is what medlvr/train/vlpo/objective.py makes for full
  fine-tuning and for a LoRA that already holds stage-1 training; "adapter", that stage-1
  adapter kept as a second frozen adapter on the same base weights: the LoRA modes' choice
  at scale, adapter bytes only; "none": kl_beta = 0), the rollout engine's KV cache
  (bf16, n rollouts x groups per rank, prompt + K + answer tokens) and, under FSDP, the
  full bf16 weights gathered once per rollout phase (verl's FSDP rollout does the same).

The weight, gradient and Adam rows are checked against bytes measured on a real-width model
(tests/train/test_plan.py); activations and KV cache are estimates.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

MODES = ("ddp-lora", "fsdp-full", "fsdp-lora")
GiB = 2**30

# Qwen/Qwen2.5-VL-7B-Instruct config.json (the numbers that size the model).
QWEN25_VL_7B = {
    "tie_word_embeddings": False,
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "in_channels": 3,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584},
}
PRESETS = {"qwen2.5-vl-7b": QWEN25_VL_7B}


def load_config(model: str) -> dict:
    """A config dict from a preset name, "default" (the embedded model), a checkpoint dir or a
    config.json file."""
    if model in PRESETS:
        return PRESETS[model]
    if model == "default":
        from medlvr.models.default import ASSETS

        model = str(ASSETS / "config.json")
    p = Path(model)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"model: expected {', '.join(PRESETS)}, 'default', a checkpoint dir or a config.json, "
                         f"got {model!r} (no such file)")
    cfg = json.loads(f.read_text())
    if "text_config" not in cfg or "vision_config" not in cfg:
        raise ValueError(f"model: {f} is not a Qwen2.5-VL config (no text_config / vision_config)")
    return cfg


@dataclass(frozen=True)
class Param:
    """One parameter: its shape, which FSDP unit holds it, whether it trains in each mode."""
    name: str
    shape: tuple[int, ...]
    unit: str
    lora: bool = False  # a LoRA / latent-row / projector weight (trains in the LoRA modes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_numel(self, n: int) -> int:
        """Elements of one rank's slice: fully_shard pads dim 0 to a multiple of n."""
        return -(-self.shape[0] // n) * (self.numel // self.shape[0])


def parameters(cfg: dict, *, lora: bool, lora_r: int = 16, projector: bool = False, latent_rows: int = 3
               ) -> list[Param]:
    """The model's parameters (Qwen2.5-VL), plus LoRA on q/k/v/o and the latent-token rows when
    ``lora`` and the latent projector when ``projector`` (medlvr/train/sft/objective.py)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    D, I, V, L = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["num_hidden_layers"]
    dkv = t["num_key_value_heads"] * (D // t["num_attention_heads"])
    dv, iv, m2 = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"] ** 2
    out: list[Param] = []
    add = lambda name, shape, unit, **kw: out.append(Param(name, tuple(shape), unit, **kw))  # noqa: E731
    patch = (dv, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    add("visual.patch_embed", patch, "root")
    for b in range(v["depth"]):
        u = f"visual.blocks.{b}"
        for name, shape in (("norm1", (dv,)), ("norm2", (dv,)), ("qkv.w", (3 * dv, dv)), ("qkv.b", (3 * dv,)),
                            ("proj.w", (dv, dv)), ("proj.b", (dv,)), ("gate.w", (iv, dv)), ("gate.b", (iv,)),
                            ("up.w", (iv, dv)), ("up.b", (iv,)), ("down.w", (dv, iv)), ("down.b", (dv,))):
            add(f"{u}.{name}", shape, u)
    add("visual.merger.ln_q", (dv,), "root")
    add("visual.merger.0.w", (dv * m2, dv * m2), "root")
    add("visual.merger.0.b", (dv * m2,), "root")
    add("visual.merger.2.w", (v["out_hidden_size"], dv * m2), "root")
    add("visual.merger.2.b", (v["out_hidden_size"],), "root")
    add("embed_tokens", (V, D), "embed")
    for i in range(L):
        u = f"layers.{i}"
        for name, shape in (("q.w", (D, D)), ("q.b", (D,)), ("k.w", (dkv, D)), ("k.b", (dkv,)), ("v.w", (dkv, D)),
                            ("v.b", (dkv,)), ("o.w", (D, D)), ("gate.w", (I, D)), ("up.w", (I, D)),
                            ("down.w", (D, I)), ("norm1", (D,)), ("norm2", (D,))):
            add(f"{u}.{name}", shape, u)
        if lora:
            for proj, n_out in (("q", D), ("k", dkv), ("v", dkv), ("o", D)):
                add(f"{u}.{proj}.lora_A", (lora_r, D), u, lora=True)
                add(f"{u}.{proj}.lora_B", (n_out, lora_r), u, lora=True)
    add("norm", (D,), "root")
    if not cfg.get("tie_word_embeddings", False):
        add("lm_head", (V, D), "lm_head")
    if lora:
        add("embed_tokens.trainable_tokens_delta", (latent_rows, D), "embed", lora=True)
    if projector:
        for name, shape in (("up.w", (D, D)), ("up.b", (D,)), ("down.w", (D, D)), ("down.b", (D,))):
            add(f"projector.{name}", shape, "root", lora=True)
    return out


def trains(p: Param, mode: str) -> bool:
    """LoRA modes train the LoRA weights only; full fine-tuning trains everything."""
    return p.lora or not mode.endswith("lora")


def state_bytes(params: list[Param], mode: str, gpus: int) -> dict[str, int]:
    """Per-GPU bytes of the weights, the gradients and the Adam states as the module and the
    optimizer hold them (DDP's bucket copy of the gradients is not in "grads": :func:`plan` adds it)."""
    n = gpus if mode.startswith("fsdp") else 1
    w = sum(4 * p.shard_numel(n) for p in params)
    train = [p for p in params if trains(p, mode)]
    g = sum(4 * p.shard_numel(n) for p in train)
    adam = sum(8 * p.shard_numel(n) + 4 for p in train)  # exp_avg, exp_avg_sq, the fp32 step
    return {"weights": w, "grads": g, "adam": adam}


def gathered_bytes(params: list[Param], gpus: int, elt: int = 2) -> int:
    """The whole model unsharded on one GPU (VLPO's rollout phase under FSDP): every
    parameter gathered in the all-gather dtype (``elt`` bytes: bf16), with fully_shard's
    dim-0 padding (gpus x ceil(rows / gpus) rows)."""
    return sum(elt * p.shard_numel(gpus) * gpus for p in params)


def activation_bytes(cfg: dict, tokens: int, image_tokens: int) -> int:
    """Tensors autograd keeps for one micro-batch (bf16 autocast, no recomputation), per token:

    decoder layer (D hidden, d_kv K/V width, I MLP width): the two RMSNorm inputs in fp32
    (2 x 4D, HF's Qwen2RMSNorm upcasts) and outputs (2 x 2D), q, k, v after RoPE and the
    attention output with its log-sum-exp (2(D + 2 d_kv) + 2D), the o_proj input (2D),
    gate, up and silu(gate) (3 x 2I), the down_proj input (2I): 24D + 4 d_kv + 8I bytes;
    vision block (dv, iv, image patches = 4 x merged tokens): the same form with d_kv = dv."""
    t, v = cfg["text_config"], cfg["vision_config"]
    D, I, L = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    dkv = t["num_key_value_heads"] * (D // t["num_attention_heads"])
    text = tokens * L * (24 * D + 4 * dkv + 8 * I)
    patches = image_tokens * v["spatial_merge_size"] ** 2
    vision = patches * v["depth"] * (24 * v["hidden_size"] + 4 * v["hidden_size"] + 8 * v["intermediate_size"])
    return text + vision


def kv_cache_bytes(cfg: dict, sequences: int, length: int) -> int:
    t = cfg["text_config"]
    dkv = t["num_key_value_heads"] * (t["hidden_size"] // t["num_attention_heads"])
    return 2 * t["num_hidden_layers"] * dkv * 2 * length * sequences  # K and V, bf16


@dataclass
class PlanArgs:
    gpus: int = 8
    gpu_mem: float = 80.0
    seq_len: int = 1024
    image_tokens: int = 256
    k_latent: int = 8
    micro_batch: int = 1
    rollouts: int = 8
    groups: int = 2
    max_new: int = 256
    lora_r: int = 16
    projector: bool = False
    reference: str = "copy"


REFERENCES = ("copy", "adapter", "none")


def plan(cfg: dict, a: PlanArgs) -> list[dict]:
    """One row per (stage, mode): bytes per GPU of each term and the total."""
    rows = []
    logits_chunk = 256 * 2**20
    for mode in MODES:
        params = parameters(cfg, lora=mode.endswith("lora"), lora_r=a.lora_r, projector=a.projector)
        st = state_bytes(params, mode, a.gpus)
        if mode == "ddp-lora":
            st["grads"] *= 2  # the reducer's buckets
        units: dict[str, int] = {}
        for p in params:
            units[p.unit] = units.get(p.unit, 0) + p.numel
        gathered = 0
        if mode.startswith("fsdp"):  # two units in flight in bf16, the current one's fp32 gradient
            biggest = max(units.values())
            gathered = 2 * 2 * biggest + (4 * biggest if mode == "fsdp-full" else 0)
        tokens = a.seq_len + a.k_latent
        act = a.micro_batch * activation_bytes(cfg, tokens, a.image_tokens) + logits_chunk
        sft = {**st, "reference": 0, "gathered": gathered, "activations": act, "kv_cache": 0}
        rows.append({"stage": "sft", "mode": mode, **sft, "total": sum(sft.values())})
        n_shard = a.gpus if mode.startswith("fsdp") else 1
        if a.reference == "copy" or (a.reference == "adapter" and not mode.endswith("lora")):
            ref = sum(4 * p.shard_numel(n_shard) for p in params)  # a frozen fp32 copy, sharded like the policy
        elif a.reference == "adapter":
            ref = sum(4 * p.shard_numel(n_shard) for p in params if p.lora)  # a 2nd, frozen adapter
        else:
            ref = 0
        kv = kv_cache_bytes(cfg, a.rollouts * a.groups, a.seq_len + a.k_latent + a.max_new)
        full_bf16 = gathered_bytes(params, a.gpus) if mode.startswith("fsdp") else 0
        # Rollout phase (no gradients, full weights gathered) and update phase: the larger.
        rollout = st["weights"] + st["adam"] + ref + full_bf16 + kv
        update = st["weights"] + st["grads"] + st["adam"] + ref + gathered + act
        vl = {**st, "reference": ref, "gathered": max(gathered, full_bf16), "activations": act, "kv_cache": kv}
        rows.append({"stage": "vlpo", "mode": mode, **vl, "total": max(rollout, update)})
    return rows


COLUMNS = ("weights", "grads", "adam", "reference", "gathered", "activations", "kv_cache", "total")


def format_table(rows: list[dict], gpu_mem: float) -> str:
    head = f"{'stage':<6}{'mode':<11}" + "".join(f"{c:>12}" for c in COLUMNS) + "   fits"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r[c] / GiB:>12.2f}" for c in COLUMNS)
        lines.append(f"{r['stage']:<6}{r['mode']:<11}{cells}   {'yes' if r['total'] <= gpu_mem * GiB else 'NO'}")
    return "\n".join(lines)


__all__ = ["MODES", "PRESETS", "REFERENCES", "Param", "PlanArgs", "load_config", "parameters", "state_bytes",
           "gathered_bytes", "activation_bytes", "kv_cache_bytes", "plan", "format_table"]
