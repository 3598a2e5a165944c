"""The engine holder (medlvr/engine/holder.py): one engine per model, reused while a call
fits its capacity, rebuilt larger (never smaller) when one does not; another model or
another projector gets its own; a model type without an adapter is refused by name."""
from __future__ import annotations

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
