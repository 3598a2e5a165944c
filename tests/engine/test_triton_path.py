"""The engine on the Triton kernels gives the same answer as on the PyTorch references:
the kernels' argument layouts (strided cache views, mRoPE positions, slots, masks) are the
ones the engine passes. Runs on CPU tensors under the interpreter and on CUDA tensors
natively (tests/devices.py). Small on purpose: the interpreter is ~1000x slower than a GPU.

Tolerance: fp32, 1e-4 of the largest magnitude (the kernels accumulate in another order
and, interpreted, emulate GPU rounding; a few latent steps compound it)."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
import medlvr
from devices import triton_devices
from medlvr.engine import LatentEngine


@pytest.mark.parametrize("device", triton_devices())
def test_engine_on_triton_kernels_matches_references(device):
    model = tm.qwen2_5_vl().to(device)
    batch = tm.left_pad([tm.vl_sample((2, 4), 1, seed=1), tm.vl_sample(None, 3, seed=2)])
    batch = {k: v.to(device) for k, v in batch.items()}
    kw = dict(k_max=2, exit="cosine", exit_threshold=0.95, max_new_tokens=2, latent_end_id=tm.LATENT_END,
              return_logits=True)
    # the reference is forced: on CUDA tensors the engine would pick the Triton kernels itself
    with medlvr.force_backend("reference"):
        ref = LatentEngine(model, max_batch=2, max_len=24).generate(batch, **kw)
    # fused projections: q/k/v reach the kernels as strided column views of one GEMM
    with medlvr.force_backend("triton"):
        out = LatentEngine(model, max_batch=2, max_len=24, fuse_projections=True).generate(batch, **kw)
    for a, b in ((out.latents, ref.latents), (out.logits, ref.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))
    assert out.num_latent.tolist() == ref.num_latent.tolist()
    assert out.tokens.tolist() == ref.tokens.tolist()


@pytest.mark.parametrize("device", triton_devices())
def test_gpt2_on_triton_kernels_matches_references(device):
    """GPT-2's K/V append goes through rotary_append with one zero frequency (the identity
    rotation, medlvr/engine/adapters/gpt2.py): on the kernel too it must be a plain append."""
    model = tm.gpt2().to(device)
    ids = torch.tensor([[0, 0, 11, 12, 13, tm.LATENT_START], [21, 22, 23, 24, 25, tm.LATENT_START]], device=device)
    batch = {"input_ids": ids, "attention_mask": (torch.arange(6, device=device) >= torch.tensor(
        [[2], [0]], device=device)).long()}
    kw = dict(k_max=2, exit="count", latent_counts=[1, 2], max_new_tokens=2, latent_end_id=tm.LATENT_END,
              return_logits=True)
    with medlvr.force_backend("reference"):
        ref = LatentEngine(model, max_batch=2, max_len=16).generate(batch, **kw)
    with medlvr.force_backend("triton"):
        out = LatentEngine(model, max_batch=2, max_len=16).generate(batch, **kw)
    for a, b in ((out.latents, ref.latents), (out.logits, ref.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))
    assert out.tokens.tolist() == ref.tokens.tolist()


@pytest.mark.parametrize("device", triton_devices())
def test_grouped_engine_on_triton_kernels_matches_references(device):
    """Grouped generation's cascade (folded prefix call with lse, suffix call, merge) on
    the kernels equals the references."""
    model = tm.qwen2_5_vl().to(device)
    batch = tm.left_pad([tm.vl_sample((2, 4), 1, seed=1), tm.vl_sample(None, 3, seed=2)])
    batch = {k: v.to(device) for k, v in batch.items()}
    kw = dict(k_max=2, exit="fixed", max_new_tokens=2, latent_end_id=tm.LATENT_END, return_logits=True,
              group_size=2)
    with medlvr.force_backend("reference"):
        ref = LatentEngine(model, max_batch=4, max_len=4, max_prompts=2, max_prompt_len=20).generate(batch, **kw)
    with medlvr.force_backend("triton"):
        out = LatentEngine(model, max_batch=4, max_len=4, max_prompts=2, max_prompt_len=20).generate(batch, **kw)
    for a, b in ((out.latents, ref.latents), (out.logits, ref.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))
    assert out.tokens.tolist() == ref.tokens.tolist()
