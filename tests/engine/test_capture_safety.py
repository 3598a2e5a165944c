"""Everything the engine captures as a CUDA graph is capture-safe, checked on CPU.

``capture_checks()`` makes GraphRunner run each function it would capture (the latent
segment per exit rule, with and without noise; the text step per sampling mode) under
CaptureGuard (medlvr/capture.py), which raises on a host sync, a host<->device copy
or a tensor made from Python data. The guard itself is tested first: each thing it must
catch, caught, and ordinary device-side code left alone.
"""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
from medlvr.engine import LatentEngine
from medlvr.capture import CaptureGuard, CaptureViolation, capture_checks

X = torch.arange(6.0)

CAUGHT = {
    ".item()": lambda: X.sum().item(),
    ".tolist()": lambda: X.tolist(),
    "python if": lambda: bool(X.sum() > 0),
    "int()": lambda: int(X[0]),
    "nonzero": lambda: X.nonzero(),
    "boolean index": lambda: X[X > 2],
    "boolean index_put": lambda: X.clone().index_put_((X > 2,), torch.zeros((), dtype=X.dtype)),
    "masked_select": lambda: X.masked_select(X > 2),
    "torch.tensor(list)": lambda: torch.tensor([1, 2], device=X.device),
    "as_tensor(list)": lambda: torch.as_tensor([1.0]),
    "factory without device": lambda: torch.arange(3),
    "zeros without device": lambda: torch.zeros(2),
    ".cpu()": lambda: X.cpu(),
    ".numpy()": lambda: X.numpy(),
    "unique": lambda: torch.unique(X),
}


@pytest.mark.parametrize("name", list(CAUGHT))
def test_guard_catches(name):
    with pytest.raises(CaptureViolation, match="inside the test region"):
        with CaptureGuard("the test region"):
            CAUGHT[name]()


def test_guard_names_the_line_that_did_it():
    with pytest.raises(CaptureViolation, match=r"test_capture_safety\.py:\d+: .*X\.tolist\(\)"):
        with CaptureGuard("the test region"):
            X.tolist()


def test_guard_allows_device_side_code():
    buf = torch.zeros(6)
    with CaptureGuard("the test region"):
        y = torch.where(X > 2, X, torch.zeros_like(X))
        buf.copy_(y.masked_fill(X < 1, 0) * 2)
        torch.arange(3, device=X.device)
        torch.full_like(X, -1)
        X.new_zeros(3)
        X.to(torch.float64)
        top = torch.softmax(X, 0).argmax()
    assert torch.equal(buf, torch.tensor([0.0, 0, 0, 6, 8, 10])) and int(top) == 5


def test_guard_is_off_after_the_block():
    with CaptureGuard("the test region"):
        pass
    assert X.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


# --------------------------------------------------------------- the engine's graphs
def _batch():
    samples = [tm.vl_sample((4, 4), 3, seed=1), tm.vl_sample(None, 5, seed=2), tm.vl_sample((4, 6), 2, seed=3)]
    return tm.left_pad(samples)


@pytest.fixture(scope="module")
def vl_model():
    return tm.qwen2_5_vl(seed=0)


EXITS = [("fixed", None), ("cosine", 0.5), ("stop_logit", None), ("stop_logit", 0.0)]
SAMPLING = [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_p=0.7)]


@pytest.mark.parametrize("exit,threshold", EXITS)
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_latent_segment_is_capture_safe(vl_model, exit, threshold, noise):
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    gen = torch.Generator().manual_seed(0) if noise else None
    with capture_checks():
        out = engine.generate(_batch(), k_max=3, exit=exit, exit_threshold=threshold, max_new_tokens=2,
                              latent_end_id=tm.LATENT_END, latent_noise_std=noise, generator=gen)
    assert out.latents.shape[:2] == (3, 3)


NEW_EXITS = [dict(exit="end_distance", exit_threshold=0.5, end_embedding=torch.zeros(64)),
             dict(exit="end_distance", exit_threshold=0.5, end_embedding=torch.zeros(64), exit_distance="l2",
                  exit_distance_on="next", after_exit="model"),
             dict(exit="count", latent_counts=[1, 3, 0], stop_first=False),
             dict(exit="stop_logit", exit_check_start=True),
             dict(exit="stop_logit", exit_scope="batch", exit_check_start=True, after_exit="mirage",
                  latent_pad_id=tm.LATENT_PAD)]


@pytest.mark.parametrize("kw", NEW_EXITS, ids=["lvr-distance", "l2-next-model", "count", "check-start", "mirage"])
def test_drop_in_exit_rules_are_capture_safe(vl_model, kw):
    """The exit rules of the drop-in presets (medlvr/engine/exit_rules.py) run inside
    the segment graph, and what follows them inside the text graph."""
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    with capture_checks():
        out = engine.generate(_batch(), k_max=3, max_new_tokens=2, latent_end_id=tm.LATENT_END, **kw)
    assert out.latents.shape[:2] == (3, 3)


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "temperature", "top_p"])
@pytest.mark.parametrize("with_generator", [False, True])
def test_text_step_is_capture_safe(vl_model, sampling, with_generator):
    engine = LatentEngine(vl_model, max_batch=4, max_len=64)
    gen = torch.Generator().manual_seed(0) if with_generator else None
    with capture_checks():
        out = engine.generate(_batch(), k_max=2, max_new_tokens=4, latent_end_id=tm.LATENT_END,
                              stop_ids=[tm.LATENT_END], generator=gen, **sampling)
    assert out.tokens.shape == (3, 4)


def test_text_step_is_capture_safe_with_peft_trainable_tokens(vl_model):
    """VLPO from a stage-1 LoRA run: peft's trainable-token embedding builds its index
    tensor from a Python list on every call (a host->device copy on CUDA). The engine must
    embed those rows without it."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(vl_model), LoraConfig(
        r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
        trainable_token_indices={"embed_tokens": [tm.LATENT_START, tm.LATENT_END, tm.LATENT_PAD]}))
    with torch.no_grad():  # the new rows differ from the base rows, as after training
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(1.0)
    base = model.get_base_model()  # what VLPO's RolloutEngine hands the engine
    engine = LatentEngine(base, max_batch=4, max_len=64)
    # the engine's lookup equals peft's merged embedding, trained rows included
    ids = torch.tensor([[1, tm.LATENT_START, 11, tm.LATENT_END], [tm.LATENT_PAD, 3, 4, 5]])
    with torch.no_grad():
        want = base.get_input_embeddings()(ids)
        assert not torch.equal(want, vl_model.get_input_embeddings()(ids))
        assert torch.equal(engine.adapter.embed_tokens(ids), want)
    with capture_checks():
        out = engine.generate(_batch(), k_max=2, max_new_tokens=3, latent_end_id=tm.LATENT_END,
                              temperature=1.0, generator=torch.Generator().manual_seed(0))
    plain = LatentEngine(base, max_batch=4, max_len=64).generate(
        _batch(), k_max=2, max_new_tokens=3, latent_end_id=tm.LATENT_END, temperature=1.0,
        generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, plain.tokens)


@pytest.mark.parametrize("exit,threshold", [("fixed", None), ("stop_logit", None)])
def test_grouped_generation_is_capture_safe(vl_model, exit, threshold):
    """Grouped rows (medlvr/engine/group.py): the cascade prefix/suffix/merge in the
    latent segment and the text step, sampled with latent noise."""
    engine = LatentEngine(vl_model, max_batch=8, max_len=8, max_prompts=3, max_prompt_len=32)
    with capture_checks():
        out = engine.generate(_batch(), group_size=2, k_max=3, exit=exit, exit_threshold=threshold,
                              max_new_tokens=3, latent_end_id=tm.LATENT_END, temperature=1.0, top_p=0.8,
                              latent_noise_std=0.1, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (6, 3)
