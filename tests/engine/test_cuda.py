"""GPU checks of the engine (skipped without CUDA): CUDA graphs against eager, bucket
padding, and bf16 against the fp32 HF reference loop.

Tolerances: graphs vs eager run the same kernels, so fp32 results agree to 1e-6
(cuBLAS may pick another algorithm under capture) and tokens exactly. bf16 vs fp32:
latents within 5e-2 of the largest magnitude over the first 3 steps (bf16 has 8 bits
of mantissa; a few layers of rounding compound), and the first answer token's logits
within 1e-1 of it.
"""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from engine_reference import hf_latent_loop
from medlvr.engine import LatentEngine

pytestmark = pytest.mark.cuda

SAMPLES = [((4, 6), 3, 1), ((2, 2), 6, 2), (None, 4, 3)]  # B = 3 -> graph bucket 4


def _batch(device, dtype=torch.float32):
    samples = [tm.vl_sample(hw, n, seed=s) for hw, n, s in SAMPLES]
    batch = tm.left_pad(samples)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return samples, batch


def _close(actual, expected, rel):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel,
                               atol=rel * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("exit, thr", [("fixed", None), ("cosine", 0.95), ("stop_logit", 0.3)])
def test_graphs_match_eager(exit, thr):
    model = tm.qwen2_5_vl().cuda()
    _, batch = _batch("cuda")
    kw = dict(k_max=6, exit=exit, exit_threshold=thr, max_new_tokens=6, latent_end_id=tm.LATENT_END,
              stop_ids=[2], return_logits=True)
    eager = LatentEngine(model, max_batch=4, max_len=64, use_cuda_graphs=False).generate(batch, **kw)
    graphed = LatentEngine(model, max_batch=4, max_len=64, use_cuda_graphs=True)
    first = graphed.generate(batch, **kw)
    again = graphed.generate(batch, **kw)  # replays the captured graphs
    for out in (first, again):
        _close(out.latents, eager.latents, 1e-6)
        assert out.num_latent.tolist() == eager.num_latent.tolist()
        assert out.tokens.tolist() == eager.tokens.tolist()
        _close(out.logits, eager.logits, 1e-6)
    assert len(graphed._graphs) > 0, "no graph was captured"


def test_graphs_fp32_match_hf_loop():
    model = tm.qwen2_5_vl().cuda()
    samples, batch = _batch("cuda")
    out = LatentEngine(model, max_batch=4, max_len=64).generate(
        batch, k_max=4, max_new_tokens=4, latent_end_id=tm.LATENT_END, return_logits=True)
    for b, (ids, pv, grid) in enumerate(samples):
        r = hf_latent_loop(model, ids.cuda(), None if pv is None else pv.cuda(), None if grid is None else grid.cuda(),
                           k_max=4, latent_end_id=tm.LATENT_END, max_new_tokens=4)
        _close(out.latents[b], torch.stack(r.latents), 1e-4)
        assert out.tokens[b].tolist() == r.tokens


def test_bf16_within_tolerance_of_fp32_reference():
    ref_model = tm.qwen2_5_vl()
    model = tm.qwen2_5_vl(dtype=torch.bfloat16).cuda()
    samples, batch = _batch("cuda", torch.bfloat16)
    out = LatentEngine(model, max_batch=4, max_len=64).generate(
        batch, k_max=3, max_new_tokens=1, latent_end_id=tm.LATENT_END, return_logits=True)
    for b, s in enumerate(samples):
        r = hf_latent_loop(ref_model, *s, k_max=3, latent_end_id=tm.LATENT_END, max_new_tokens=1)
        _close(out.latents[b].cpu(), torch.stack(r.latents), 5e-2)
        _close(out.logits[b, 0].cpu(), r.logits[0], 1e-1)


def test_sampling_reproducible_with_cuda_generator():
    model = tm.qwen2_5_vl().cuda()
    _, batch = _batch("cuda")
    engine = LatentEngine(model, max_batch=4, max_len=64)
    kw = dict(k_max=2, max_new_tokens=8, latent_end_id=tm.LATENT_END, temperature=0.9, top_p=0.9)
    a = engine.generate(batch, generator=torch.Generator("cuda").manual_seed(0), **kw)
    b = engine.generate(batch, generator=torch.Generator("cuda").manual_seed(0), **kw)
    assert a.tokens.tolist() == b.tokens.tolist()
