"""The plain-HF latent loop (medlvr/engine/hf_loop.py: one decoder call per step over a
DynamicCache) against its cacheless spec (medlvr/reference/latent_loop.py: the whole decoder
again at every step, explicit positions), fixed K, greedy, on the embedded default model
(medlvr.models.build_default(seed=0)) with a ragged left-padded batch (two image sizes and a
text-only prompt, so different padding and mRoPE deltas).

Tolerance: fp32 1e-5 relative to the largest magnitude of the compared tensor (the two differ
only in the order of the attention reductions: cached keys against a full recompute); fp64
1e-10 (DESIGN.md section 7: the cached loop equals one full forward bit-exactly in fp64 up to
the reduction order)."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.engine.hf_loop import latent_loop
from medlvr.models import build_default, latent_token_ids
from medlvr.reference.latent_loop import latent_loop_ref

SAMPLES = [((4, 6), 3, 1), ((2, 2), 6, 2), (None, 4, 3)]
T = 5
REL = {torch.float32: 1e-5, torch.float64: 1e-10}


def close(actual, expected, dtype):
    rel = REL[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(1.0, scale))


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def default(request):
    model, processor = build_default(seed=0, dtype=request.param)
    return model, latent_token_ids(processor), request.param


def _batch(ids, dtype):
    samples = [tm.vl_sample(hw, n, seed=s) for hw, n, s in SAMPLES]
    # the prompts end with the default tokenizer's own <|latent_start|>
    samples = [(torch.cat([x[:-1], torch.tensor([ids.start])]), pv, grid) for x, pv, grid in samples]
    batch = tm.left_pad(samples)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def _projector(D, dtype):
    torch.manual_seed(5)
    proj = torch.nn.Linear(D, D).to(dtype)
    with torch.no_grad():
        proj.weight.add_(torch.eye(D, dtype=dtype))  # near the identity: latents stay in range
    return proj


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("noise", [False, True], ids=["no_noise", "noise"])
@pytest.mark.parametrize("first", [True, False], ids=["first_token", "from_last_hidden"])
def test_hf_loop_equals_cacheless_spec(default, k, noise, first):
    model, ids, dtype = default
    batch = _batch(ids, dtype)
    B, D = batch["input_ids"].shape[0], model.config.text_config.hidden_size
    eps = torch.randn(B, k, D, generator=torch.Generator().manual_seed(7)).to(dtype) if noise else None
    kw = dict(k=k, max_new_tokens=T, first_token=ids.end if first else None, latent_noise_std=0.5 if noise else 0.0,
              latent_eps=eps, pad_id=0)
    # a stop id from an unstopped run, so that row 0 stops inside the answer and is padded after
    free = latent_loop(model, batch, **kw)
    stop = [int(free.tokens[0, 2])]
    out = latent_loop(model, batch, stop_ids=stop, return_logits=True, **kw)
    ref = latent_loop_ref(model, batch, stop_ids=stop, **kw)
    assert out.latents.shape == ref.latents.shape == (B, k, D)
    close(out.latents, ref.latents, dtype)
    assert out.tokens.tolist() == ref.tokens.tolist()
    close(out.logits, ref.logits, dtype)
    assert bool(out.stopped[0]) and int(out.text_lengths[0]) <= 3  # the stop path ran


def test_hf_loop_equals_spec_with_a_projector(default):
    model, ids, dtype = default
    batch = _batch(ids, dtype)
    proj = _projector(model.config.text_config.hidden_size, dtype)
    kw = dict(k=2, max_new_tokens=T, first_token=ids.end, projector=proj)
    out = latent_loop(model, batch, return_logits=True, **kw)
    ref = latent_loop_ref(model, batch, **kw)
    close(out.latents, ref.latents, dtype)
    assert out.tokens.tolist() == ref.tokens.tolist()
    close(out.logits, ref.logits, dtype)


def test_spec_needs_the_noise_draws(default):
    model, ids, dtype = default
    with pytest.raises(ValueError, match="latent_eps"):
        latent_loop_ref(model, _batch(ids, dtype), k=2, max_new_tokens=1, latent_noise_std=0.5)
