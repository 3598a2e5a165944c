"""Bad input gets a clear error before anything runs; the cache is never written past
a sample's own length, nor past max_len."""
from __future__ import annotations

import types

import pytest
import torch

import engine_models as tm
from medlvr.engine import LatentEngine, supported_model_types


@pytest.fixture(scope="module")
def vl_model():
    return tm.qwen2_5_vl()


def _batch(n=2):
    return tm.left_pad([tm.vl_sample((2, 4), 3, seed=1), tm.vl_sample((2, 2), 5, seed=2)][:n])


def _gen(engine, batch, **kw):
    args = dict(k_max=3, max_new_tokens=3, latent_end_id=tm.LATENT_END)
    args.update(kw)
    return engine.generate(batch, **args)


def test_unknown_model_type_lists_supported():
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="gpt_neox")
    with pytest.raises(ValueError, match="model_type must be one of .*qwen2_5_vl.*'gpt_neox'"):
        LatentEngine(model, max_batch=1, max_len=8)
    assert {"qwen2_5_vl", "qwen2_vl", "qwen2", "llama", "gpt2"} <= set(supported_model_types())


def test_batch_over_max_batch(vl_model):
    with pytest.raises(ValueError, match=r"batch size must be in \[1, max_batch=1\], got 2"):
        _gen(LatentEngine(vl_model, max_batch=1, max_len=64), _batch())


def test_sequence_over_max_len_and_exact_fit(vl_model):
    batch = _batch()
    longest = int(batch["attention_mask"].sum(-1).max())
    need = longest + 3 + 3  # prompt + k_max latents + (<|latent_end|> + 2 answer tokens fed)
    with pytest.raises(ValueError, match=f"= {need} > max_len {need - 1}"):
        _gen(LatentEngine(vl_model, max_batch=2, max_len=need - 1), batch)
    out = _gen(LatentEngine(vl_model, max_batch=2, max_len=need), batch)  # exactly fits
    assert out.tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="does not fit max_len"):
        LatentEngine(vl_model, max_batch=2, max_len=longest - 1).prefill(batch)


def test_step_calls_check_capacity(vl_model):
    batch = _batch()
    longest = int(batch["attention_mask"].sum(-1).max())
    engine = LatentEngine(vl_model, max_batch=2, max_len=longest + 4)
    engine.prefill(batch)
    with pytest.raises(ValueError, match="exceed max_len"):
        engine.latent_segment(5)
    engine.latent_segment(4)
    with pytest.raises(ValueError, match="exceed max_len"):
        engine.decode_text(1, first_token=tm.LATENT_END)


def test_images_must_match_grids(vl_model):
    engine = LatentEngine(vl_model, max_batch=2, max_len=64)
    bad = dict(_batch())
    bad["pixel_values"] = bad["pixel_values"][:-1]
    with pytest.raises(ValueError, match=r"pixel_values'\] must have 12 rows"):
        _gen(engine, bad)
    bad = dict(_batch())
    bad["image_grid_thw"] = torch.tensor([[1, 2, 4], [1, 4, 1]])
    with pytest.raises(ValueError, match="divisible by the spatial merge size"):
        _gen(engine, bad)
    bad = dict(_batch())
    bad["image_grid_thw"] = torch.tensor([[1, 2, 4], [1, 2, 4]])
    bad["pixel_values"] = torch.cat([bad["pixel_values"], bad["pixel_values"][:4]])
    with pytest.raises(ValueError, match="holds 3 image tokens but image_grid_thw"):
        _gen(engine, bad)
    bad = dict(_batch())
    bad["image_grid_thw"] = torch.tensor([[1, 2, 2], [1, 2, 4]])  # same totals, swapped between samples
    with pytest.raises(ValueError, match="sample 0 holds 2 image tokens, which do not match"):
        _gen(engine, bad)
    bad = dict(_batch())
    del bad["image_grid_thw"]
    with pytest.raises(ValueError, match="must be given together"):
        _gen(engine, bad)


def test_prompts_must_be_left_padded(vl_model):
    batch = _batch()
    right = {k: v for k, v in batch.items()}
    right["attention_mask"] = batch["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="left-padded"):
        _gen(LatentEngine(vl_model, max_batch=2, max_len=64), right)


@pytest.mark.parametrize("kw, match", [
    (dict(latent_end_id=None), "latent_end_id is required"),
    (dict(exit="sometimes"), "exit must be one of"),
    (dict(exit="cosine", exit_threshold=2.0), r"must lie in \[-1, 1\]"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be a float in \(0, 1\]"),
    (dict(stop_ids=list(range(17))), "at most 16"),
    (dict(stop_ids=[tm.VOCAB]), r"stop_ids entries must be a token id in \[0, 96\)"),
    (dict(k_max=-1), "k_max must be an int >= 0"),
])
def test_bad_generate_arguments(vl_model, kw, match):
    with pytest.raises(ValueError, match=match):
        _gen(LatentEngine(vl_model, max_batch=2, max_len=64), _batch(), **kw)


def test_bad_engine_arguments(vl_model):
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        LatentEngine(vl_model, max_batch=0, max_len=8)
    with pytest.raises(ValueError, match="use_cuda_graphs=True needs a CUDA model"):
        LatentEngine(vl_model, max_batch=1, max_len=8, use_cuda_graphs=True)
    with pytest.raises(RuntimeError, match="call prefill"):
        LatentEngine(vl_model, max_batch=1, max_len=8).latent_segment(2)


def test_nothing_written_past_each_samples_length(vl_model):
    """Sentinel-filled cache: after a ragged generate with early exits and early stops,
    every position at or past a sample's prompt + latents + fed text is untouched, and
    the engine's lengths say exactly that."""
    samples = [tm.vl_sample((2, 4), 3, seed=1), tm.vl_sample((2, 2), 5, seed=2), tm.vl_sample(None, 2, seed=3)]
    batch = tm.left_pad(samples)
    engine = LatentEngine(vl_model, max_batch=4, max_len=40)
    sentinel = 1234.5
    for t in engine.cache.k + engine.cache.v:
        t.fill_(sentinel)
    probe = _gen(engine, batch, k_max=6, max_new_tokens=6)
    stop = int(probe.tokens[0, 1])  # sample 0 stops after two tokens
    thr = float(torch.quantile(torch.nn.functional.cosine_similarity(
        probe.latents[:, 1:], probe.latents[:, :-1], dim=-1), 0.5))
    for t in engine.cache.k + engine.cache.v:
        t.fill_(sentinel)
    out = _gen(engine, batch, k_max=6, max_new_tokens=6, exit="cosine", exit_threshold=thr, stop_ids=[stop])
    written = out.prompt_lengths + out.num_latent + out.text_lengths
    assert out.num_latent.unique().numel() > 1 and out.text_lengths.unique().numel() > 1
    assert engine.state.lengths[:3].tolist() == written.tolist()
    for t in engine.cache.k + engine.cache.v:
        for b in range(3):
            n = int(written[b])
            assert torch.all(t[b, :, n:] == sentinel), f"sample {b} wrote past its length {n}"
            assert not torch.any(t[b, :, :n] == sentinel)
        assert torch.all(t[3:] == sentinel)
