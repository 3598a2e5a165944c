"""fuse_projections=True: one q/k/v GEMM and one gate/up GEMM per layer, from weight
copies kept in sync with the model.

Devices (tests/devices.py): CPU, where the engine runs the PyTorch references, and CUDA,
where it picks the Triton kernels and CUDA graphs itself. Tolerance relative to the
largest magnitude: 1e-5 on CPU (only reduction orders differ); 1e-4 on CUDA, where the
kernels accumulate in another order than HF's SDPA/eager ops and cuBLAS picks per-shape
GEMM algorithms (fused and unfused shapes differ), as in test_cuda.py.
"""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from devices import kernel_devices
from engine_reference import hf_latent_loop
from medlvr.engine import LatentEngine

KW = dict(k_max=4, max_new_tokens=4, latent_end_id=tm.LATENT_END, return_logits=True)
REL = {"cpu": 1e-5, "cuda": 1e-4}


def _close(actual, expected, device):
    rel = REL[device]
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(1.0, float(expected.abs().max())))


def _on(device, sample):
    return tuple(None if t is None else t.to(device) for t in sample)


def _batch(samples, device):
    return {k: v.to(device) for k, v in tm.left_pad(samples).items()}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llama"])
def test_fused_matches_hf_loop(family, device):
    if family == "llama":  # q/k/v biases on, one kv head
        model = tm.llama().to(device)
        samples = [(tm.vl_sample(None, n, seed=s)[0], None, None) for n, s in ((3, 1), (7, 2))]
    else:
        model = tm.qwen2_5_vl().to(device)
        samples = [tm.vl_sample((4, 6), 3, seed=1), tm.vl_sample(None, 5, seed=2)]
    engine = LatentEngine(model, max_batch=2, max_len=48, fuse_projections=True)
    assert all(f is not None for f in engine.fused.layers)
    out = engine.generate(_batch(samples, device), **KW)
    for b, s in enumerate(samples):
        r = hf_latent_loop(model, *_on(device, s), k_max=4, latent_end_id=tm.LATENT_END, max_new_tokens=4)
        _close(out.latents[b], torch.stack(r.latents), device)
        _close(out.logits[b], torch.stack(r.logits), device)
        assert out.tokens[b].tolist() == r.tokens


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_weights_follow_in_place_updates(device):
    model = tm.qwen2_5_vl().to(device)
    batch = _batch([tm.vl_sample((2, 4), 3, seed=1)], device)
    engine = LatentEngine(model, max_batch=1, max_len=48, fuse_projections=True)
    before = engine.generate(batch, **KW)
    # what an optimizer step does: in-place updates under no_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.05
    opt.step()
    after = engine.generate(batch, **KW)
    fresh = LatentEngine(model, max_batch=1, max_len=48).generate(batch, **KW)
    assert not torch.allclose(before.latents, after.latents)
    _close(after.latents, fresh.latents, device)
    # writes through .data are invisible to the version check: refresh_weights() picks them up
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.up_proj.weight.data.mul_(1.5)
    engine.refresh_weights()
    fresh = LatentEngine(model, max_batch=1, max_len=48).generate(batch, **KW)
    _close(engine.generate(batch, **KW).latents, fresh.latents, device)


@pytest.mark.parametrize("device", kernel_devices())
def test_wrapped_projections_stay_unfused(device):
    """A LoRA-style wrapper around a projection keeps that layer on module calls, so the
    adapter's contribution is not bypassed."""
    model = tm.qwen2_5_vl()

    class Wrapped(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.delta = torch.nn.Linear(base.in_features, base.out_features, bias=False)
            torch.nn.init.normal_(self.delta.weight, std=0.05)

        def forward(self, x):
            return self.base(x) + self.delta(x)

    attn = model.model.language_model.layers[0].self_attn
    attn.q_proj = Wrapped(attn.q_proj)
    model.to(device)
    samples = [tm.vl_sample((2, 4), 3, seed=1)]
    engine = LatentEngine(model, max_batch=1, max_len=48, fuse_projections=True)
    assert engine.fused.layers[0] is None and engine.fused.layers[1] is not None
    out = engine.generate(_batch(samples, device), **KW)
    r = hf_latent_loop(model, *_on(device, samples[0]), k_max=4, latent_end_id=tm.LATENT_END, max_new_tokens=4)
    _close(out.latents[0], torch.stack(r.latents), device)
