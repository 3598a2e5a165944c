"""The calls whose Triton launches tests/ops/test_decode_compile.py compiles: the package's
public ops (medlvr.ops.decode, medlvr.ops.roi_align_loss, and medlvr.engine.group's
cascade attention) with arguments made the way the engine and the trainer make them,
at the shapes of the models the package supports.

As the engine passes them (medlvr/engine/step.py, medlvr/engine/state.py): q, k and v
are views of one fused projection output; the caches are (B_max Hkv L_max Dh) and handed
whole on CUDA; lengths, slots and positions are int64; the prefix cache of grouped rows is
(prompts Hkv L_prompt Dh). Model shapes from the Hugging Face configs (hidden size,
heads, kv heads; head_dim = hidden / heads):
    Qwen2.5-VL-7B-Instruct  3584, 28, 4 (head_dim 128), mrope_section (16, 24, 24)
    Qwen2.5-VL-3B-Instruct  2048, 16, 2 (head_dim 128), mrope_section (16, 24, 24)
    GPT-2 (124M)             768, 12, 12 (head_dim 64), learned positions: the engine's
                             GPT-2 adapter appends K/V through rotary_append with
                             rotary_dim 2 and a zero frequency (medlvr/engine/adapters/gpt2.py)
Every function takes torch's FakeTensorMode as given (tests/ops/_launch_capture.py).
"""
from __future__ import annotations

import itertools

import torch

MODELS = {
    "qwen7b": dict(D=3584, Hq=28, Hkv=4, Dh=128, mrope=(16, 24, 24), rd=128, rms=True),
    "qwen3b": dict(D=2048, Hq=16, Hkv=2, Dh=128, mrope=(16, 24, 24), rd=128, rms=True),
    "gpt2": dict(D=768, Hq=12, Hkv=12, Dh=64, mrope=None, rd=2, rms=False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEV = "cuda:0"


def _qkv(m, B, dt):
    """q, k, v as the engine's fused projection hands them: views of one (B, (Hq+2Hkv)·Dh) row."""
    Hq, Hkv, Dh = m["Hq"], m["Hkv"], m["Dh"]
    qkv = torch.empty(B, (Hq + 2 * Hkv) * Dh, dtype=dt, device=DEV)
    q, k, v = qkv.split([Hq * Dh, Hkv * Dh, Hkv * Dh], dim=1)
    return q.view(B, Hq, Dh), k.view(B, Hkv, Dh), v.view(B, Hkv, Dh)


def decode_step(model: str, B: int, L: int, dtype: str) -> None:
    """One layer of a plain decode step: rotary + append, attention, the residual adds and
    norms, the final norm fed back as the next latent input."""
    from medlvr.ops.decode import add_rmsnorm, decode_attention, rmsnorm_feedback, rotary_append

    m, dt = MODELS[model], DTYPES[dtype]
    Hkv, Dh, D = m["Hkv"], m["Dh"], m["D"]
    q, k, v = _qkv(m, B, dt)
    kc = torch.empty(B, Hkv, L, Dh, dtype=dt, device=DEV)
    vc = torch.empty_like(kc)
    length = torch.empty(B, dtype=torch.long, device=DEV)
    pos = torch.empty(3, B, dtype=torch.long, device=DEV) if m["mrope"] else torch.empty(B, dtype=torch.long,
                                                                                            device=DEV)
    inv_freq = torch.empty(m["rd"] // 2, dtype=torch.float32, device=DEV)
    q = rotary_append(q, k, v, positions=pos, inv_freq=inv_freq, mrope_section=m["mrope"], k_cache=kc, v_cache=vc,
                      slots=length, rotary_dim=m["rd"])
    decode_attention(q, kc, vc, length)
    if not m["rms"]:
        return
    x = torch.empty(B, D, dtype=dt, device=DEV)
    w = torch.empty(D, dtype=dt, device=DEV)
    add_rmsnorm(x, torch.empty(B, D, dtype=dt, device=DEV), w, eps=1e-6)
    if dt == torch.bfloat16:  # under bf16 autocast: a bf16 projection output onto an fp32 residual
        add_rmsnorm(x, torch.empty(B, D, dtype=torch.float32, device=DEV), w, eps=1e-6)
    rmsnorm_feedback(x, w, eps=1e-6, out=torch.empty(B, D, dtype=dt, device=DEV),
                     active=torch.empty(B, dtype=torch.bool, device=DEV))


def grouped_step(model: str, G: int, prompts: int, L_prompt: int, dtype: str, L_suffix: int = 1024) -> None:
    """One layer's attention of grouped rollouts (prompts x G rows): cascade attention over
    the shared prompt cache and each row's own suffix cache (medlvr/engine/group.py)."""
    from medlvr.engine.group import cascade_attention

    m, dt = MODELS[model], DTYPES[dtype]
    Hkv, Dh = m["Hkv"], m["Dh"]
    B = prompts * G
    q, _, _ = _qkv(m, B, dt)
    kc = torch.empty(B, Hkv, L_suffix, Dh, dtype=dt, device=DEV)
    kp = torch.empty(prompts, Hkv, L_prompt, Dh, dtype=dt, device=DEV)
    long = dict(dtype=torch.long, device=DEV)
    cascade_attention(q, kc, torch.empty_like(kc), torch.empty(B, **long), k_prefix=kp, v_prefix=torch.empty_like(kp),
                      group=G, prompts=prompts, prompt_lengths=torch.empty(prompts, **long),
                      row_prompt=torch.empty(B, **long), row_lengths=torch.empty(B, **long), scale=None)


def _geometry(K: int, wide: bool):
    """A batch of two 1036 x 1036 px images (37 x 37 merged tokens each) and 4 boxes a
    image, prepared on the CPU as the data loader does, moved to the fake device."""
    from medlvr.ops.roi_align_loss import prepare_roi_geometry
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    gh = max(g for g in range(1, K + 1) if K % g == 0 and g * g <= K)
    with unset_fake_temporarily():
        grid = torch.tensor([[1, 74, 74], [1, 74, 74]])
        span = 900.0 if wide else 120.0
        boxes = torch.tensor([[10.0, 20.0, 10.0 + span, 20.0 + span * 0.5], [0.0, 0.0, 60.0, 60.0],
                              [100.0, 300.0, 100.0 + span * 0.7, 1000.0], [500.0, 500.0, 530.0, 520.0]] * 2)
        geo = prepare_roi_geometry(grid, boxes, torch.tensor([0] * 4 + [1] * 4), bins=(gh, K // gh))
    return geo.to(DEV), geo.num_rois, 2 * 37 * 37


def roi_loss(K: int, dtype: str, pooling: str, loss: str, wide: bool, D: int = 3584) -> None:
    """Forward and backward (latents and vision tokens) of the ROI loss at Qwen2.5-VL-7B's
    hidden size."""
    from medlvr.ops.roi_align_loss import roi_align_loss

    geo, R, T = _geometry(K, wide)
    dt = DTYPES[dtype]
    lat = torch.empty(R, K, D, dtype=dt, device=DEV, requires_grad=True)
    vis = torch.empty(T, D, dtype=dt, device=DEV, requires_grad=True)
    out = roi_align_loss(lat, vis, geometry=geo, pooling=pooling, loss=loss, detach_target=False)
    # The autograd node is called directly: the engine's backward pass would look for a CUDA
    # context for the (fake) device; the node runs the op's backward, the launches we want.
    out.grad_fn.apply(torch.ones_like(out))


def workloads(full: bool):
    """(label, callable) for every call. full: the whole grid of the issue; otherwise a
    sample that still holds every kernel variant the launchers can pick at these shapes
    (models, dtypes, one-split and split-K, fold and row map, both poolings)."""
    if full:
        dec = itertools.product(MODELS, (1, 8, 32, 64), (1024, 4096, 32768), DTYPES)
        grp = itertools.product(("qwen7b", "qwen3b"), (4, 8, 16), (1, 8), (1024, 4096, 32768), DTYPES)
        roi = itertools.product((4, 8, 16), DTYPES, ("area", "bilinear"), ("cosine", "mse"), (False, True))
    else:
        dec = [("qwen7b", b, L, d) for d in DTYPES for b, L in ((1, 4096), (64, 32768))]
        dec += [("qwen3b", 8, 1024, "bf16"), ("gpt2", 8, 1024, "fp32"), ("gpt2", 1, 32768, "fp16")]
        # folds of 28 (G=4), 56 (G=8) and 64 (3B, G=8) rows; the row map (7B, G=16: 112 rows)
        grp = [("qwen7b", g, 1, 4096, d) for g in (4, 8, 16) for d in ("fp32", "bf16")]
        grp += [("qwen3b", 8, 8, 32768, "fp32"), ("qwen3b", 8, 8, 32768, "fp16")]
        roi = [(4, "fp32", "area", "cosine", False), (16, "bf16", "bilinear", "cosine", True),
               (8, "fp16", "area", "mse", True)]
    out = [(f"decode {mo} B={b} L={L} {d}", lambda a=(mo, b, L, d): decode_step(*a)) for mo, b, L, d in dec]
    out += [(f"grouped {mo} G={g} P={p} L={L} {d}", lambda a=(mo, g, p, L, d): grouped_step(*a))
            for mo, g, p, L, d in grp]
    out += [(f"roi K={k} {d} {pool} {lo}{' wide' if wide else ''}", lambda a=(k, d, pool, lo, wide): roi_loss(*a))
            for k, d, pool, lo, wide in roi]
    return out
