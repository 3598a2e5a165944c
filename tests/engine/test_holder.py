"""The engine holder (medlvr/engine/holder.py): one engine per model, reused while a call
fits its capacity, rebuilt larger (never smaller) when one does not; another model or
another projector gets its own; a model type without an adapter is refused by name; the
per-model cache does not keep a model (or its engine) alive."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import engine_models as tm
from medlvr.engine import EngineHolder, LatentEngine, holder_for, supported_model_types, supports
from medlvr.engine.holder import release


@pytest.fixture(scope="module")
def llama():
    return tm.llama(0)


def test_reused_while_it_fits(llama):
    h = EngineHolder(llama, len_multiple=16)
    e = h.get(rows=3, max_len=10)
    assert isinstance(e, LatentEngine) and (e.max_batch, e.max_len, h.builds) == (3, 16, 1)
    assert h.get(rows=3, max_len=16) is e and h.get(rows=1, max_len=2) is e and h.builds == 1


def test_grows_to_the_larger_need_and_never_shrinks(llama):
    h = EngineHolder(llama, len_multiple=16)
    e1 = h.get(rows=4, max_len=10)
    e2 = h.get(rows=2, max_len=17)  # longer: rebuilt; rows kept at the earlier 4
    assert e2 is not e1 and (e2.max_batch, e2.max_len, h.builds) == (4, 32, 2)
    e3 = h.get(rows=6, max_len=5)  # more rows: rebuilt; length kept at 32
    assert (e3.max_batch, e3.max_len, h.builds) == (6, 32, 3)
    e4 = h.get(rows=2, max_len=8, prompts=2, prompt_len=20)  # a shared prompt cache added
    assert (e4.max_batch, e4.max_len, e4.max_prompts, e4.max_prompt_len) == (6, 32, 2, 32)
    assert h.get(rows=6, max_len=32, prompts=1, prompt_len=3) is e4 and h.builds == 4


def test_length_capped_at_the_learned_positions():
    g = tm.gpt2(0)  # n_positions = 128
    h = EngineHolder(g, len_multiple=100)
    assert h.get(rows=1, max_len=101).max_len == 128  # rounding up to 200 would exceed the table
    with pytest.raises(ValueError, match="learned positions"):
        h.get(rows=1, max_len=129)


def test_engine_from_the_holder_generates_like_a_fresh_engine(llama):
    batch = {"input_ids": torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]),
             "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    kw = dict(k_max=2, max_new_tokens=3, latent_end_id=tm.LATENT_END, stop_ids=[2])
    fresh = LatentEngine(llama, max_batch=2, max_len=16).generate(batch, **kw)
    held = EngineHolder(llama).get(rows=2, max_len=4 + 2 + 3).generate(batch, **kw)
    assert torch.equal(fresh.tokens, held.tokens)
    torch.testing.assert_close(held.latents, fresh.latents)


def test_one_holder_per_model_and_settings(llama):
    other = tm.llama(1)
    a, b = holder_for(llama), holder_for(other)
    assert a is not b and a.model is llama and b.model is other
    assert a.get(rows=1, max_len=4) is not b.get(rows=1, max_len=4)
    assert holder_for(llama) is a  # kept
    proj = torch.nn.Linear(a.get(rows=1, max_len=4).adapter.hidden_size, a.engine.adapter.hidden_size)
    c = holder_for(llama, projector=proj)  # another projector: another engine
    assert c is not a and c.get(rows=1, max_len=4).projector is proj
    assert holder_for(llama, projector=proj) is c
    release(llama)
    assert holder_for(llama, projector=proj) is not c
    release(llama)
    release(other)


def test_unsupported_model_type_refused_by_name():
    m = tm.llama(0)
    m.config.model_type = "bert"
    assert not supports(m) and supports(tm.llama(0))
    with pytest.raises(ValueError, match=r"model_type must be one of .*'llama'.*got 'bert'"):
        EngineHolder(m)
    with pytest.raises(ValueError, match="model_type must be one of"):
        holder_for(m)
    assert "llama" in supported_model_types()


def test_len_multiple_checked(llama):
    with pytest.raises(ValueError, match="len_multiple"):
        EngineHolder(llama, len_multiple=0)


def _batch(widths):
    """Left-padded prompts of the given unpadded lengths (tokens 10, 11, ...)."""
    S = max(widths)
    ids = torch.zeros(len(widths), S, dtype=torch.long)
    mask = torch.zeros(len(widths), S, dtype=torch.long)
    for i, n in enumerate(widths):
        ids[i, S - n:] = torch.arange(10, 10 + n)
        mask[i, S - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_sized_from_the_batch_shape(llama):
    h = EngineHolder(llama, len_multiple=1)
    e = h.for_batch(_batch([3, 5]), k_max=2, max_new_tokens=4)
    assert (e.max_batch, e.max_len, e.max_prompts) == (2, 5 + 2 + 4, 0)
    g = h.for_batch(_batch([3, 6]), k_max=2, max_new_tokens=4, group_size=3)  # prompt in the shared cache
    assert (g.max_batch, g.max_len, g.max_prompts, g.max_prompt_len) == (6, 11, 2, 6)
    assert h.for_batch(_batch([2]), k_max=1, max_new_tokens=1, rows=5).max_batch == 6  # never smaller
    with pytest.raises(ValueError, match="group_size"):
        h.for_batch(_batch([2]), k_max=1, max_new_tokens=1, group_size=0)
    with pytest.raises(ValueError, match="rows"):
        h.for_batch(_batch([2]), k_max=1, max_new_tokens=1, rows=0)


def test_holder_generate_equals_the_engine_generate(llama):
    batch = _batch([3, 4])
    kw = dict(k_max=2, max_new_tokens=3, latent_end_id=tm.LATENT_END, stop_ids=[2])
    fresh = LatentEngine(llama, max_batch=2, max_len=16).generate(batch, **kw)
    held = EngineHolder(llama).generate(batch, **kw)
    assert torch.equal(fresh.tokens, held.tokens)
    torch.testing.assert_close(held.latents, fresh.latents)


def test_kept_holder_does_not_keep_the_model_alive():
    model = tm.llama(2)
    h = holder_for(model)
    small = h.generate(_batch([2]), k_max=1, max_new_tokens=1, latent_end_id=tm.LATENT_END)
    e1 = h.engine
    h.generate(_batch([3, 70]), k_max=2, max_new_tokens=3, latent_end_id=tm.LATENT_END)  # needs more: grows
    assert h.engine is not e1 and h.builds == 2 and holder_for(model) is h
    assert h.model is model
    refs = [weakref.ref(x) for x in (model, h, h.engine)]
    del model, h, e1, small
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
