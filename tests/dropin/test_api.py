"""medlvr.generate / patch / custom_generate on a user's model, and their bad input
(raised before the engine runs)."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
import medlvr
from medlvr.dropin import LatentSpec, presets

EOS = 2
SPEC = LatentSpec.preset("coconut", start_token=tm.LATENT_START, end_token=tm.LATENT_END, latent_token=9)


class Vocab:
    """A tokenizer as far as spec resolution sees one (get_vocab, eos_token_id)."""

    eos_token_id = EOS

    def __init__(self, names):
        self.names = names

    def get_vocab(self):
        return dict(self.names)


@pytest.fixture(scope="module")
def gpt2():
    return tm.gpt2()


def _prompt(n_latent=2, with_start=True):
    ids = [11, 12, 13] + ([tm.LATENT_START] if with_start else []) + [9] * n_latent + [tm.LATENT_END]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def test_presets_listed():
    assert presets() == ["coconut", "lvr", "lvr-latent", "lvr-steps", "medlvr", "mirage", "monet"]
    monet, mirage = LatentSpec.preset("monet"), LatentSpec.preset("mirage")
    assert monet.end_token == 151667 and monet.max_steps == 10 and not monet.start_embedded
    assert mirage.exit_scope == "batch" and mirage.max_steps == 8 and mirage.after_exit == "mirage"


def test_token_names_resolve_through_the_tokenizer(gpt2):
    tok = Vocab({"<|start-latent|>": tm.LATENT_START, "<|end-latent|>": tm.LATENT_END, "<|latent|>": 9})
    by_name = medlvr.generate(gpt2, _prompt(), spec="coconut", tokenizer=tok, max_new_tokens=3)
    by_id = medlvr.generate(gpt2, _prompt(), spec=SPEC, max_new_tokens=3, stop_ids=[EOS])
    assert torch.equal(by_name.tokens, by_id.tokens) and torch.equal(by_name.latents, by_id.latents)
    assert by_name.num_latent.tolist() == [2]


def test_token_missing_from_tokenizer_is_named(gpt2):
    tok = Vocab({"<|start-latent|>": 7, "<|latent|>": 9})
    with pytest.raises(ValueError, match=r"end_token '<\|end-latent\|>' is not in the tokenizer"):
        medlvr.generate(gpt2, _prompt(), spec="coconut", tokenizer=tok)


def test_token_id_outside_vocab(gpt2):
    with pytest.raises(ValueError, match=r"start_token id 151666 is outside the model's vocabulary \[0, 96\)"):
        medlvr.generate(gpt2, _prompt(), spec=LatentSpec.preset("monet"))


def test_model_type_without_adapter_lists_supported(gpt2):
    import copy
    m = copy.deepcopy(gpt2)
    m.config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match=r"model_type must be one of \[.*'gpt2'.*\], got 'gpt_neox'"):
        medlvr.generate(m, _prompt(), spec=SPEC)


def test_prompt_without_start_token(gpt2):
    with pytest.raises(ValueError, match="row 0 holds no latent start token"):
        medlvr.generate(gpt2, _prompt(with_start=False), spec=SPEC)


def test_text_after_the_start_token(gpt2):
    spec = LatentSpec.preset("medlvr", start_token=tm.LATENT_START, end_token=tm.LATENT_END)
    with pytest.raises(ValueError, match="must end with the start token"):
        medlvr.generate(gpt2, _prompt(), spec=spec)


def test_bad_spec():
    with pytest.raises(ValueError, match="placement must be one of"):
        LatentSpec(placement="inline")
    with pytest.raises(ValueError, match="needs end_embedding"):
        LatentSpec(exit="end_distance")
    with pytest.raises(ValueError, match="preset must be one of"):
        LatentSpec.preset("quiet-star")
    with pytest.raises(ValueError, match="exit_distance must be one of"):
        LatentSpec(exit="end_distance", end_embedding="e", exit_distance="cosine")
    with pytest.raises(ValueError, match="after_exit='mirage' needs"):
        LatentSpec(exit="stop_logit", after_exit="mirage")
    with pytest.raises(ValueError, match="start_embedded=False needs placement='after_start'"):
        LatentSpec(placement="placeholders", latent_token=9, exit="count", max_steps=None, start_embedded=False)
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match=rf"step_limit must be an int >= 1, got {bad!r}"):
            LatentSpec(step_limit=bad)


def test_lvr_has_no_step_cap_but_a_safety_limit():
    lvr = LatentSpec.preset("lvr")
    assert lvr.max_steps is None and lvr.step_limit == 256
    assert LatentSpec.preset("lvr", step_limit=1024).step_limit == 1024


def test_engine_is_cached_per_model(gpt2):
    a = medlvr.generate(gpt2, _prompt(), spec=SPEC, max_new_tokens=2)
    from medlvr.engine import holder_for
    held = lambda: holder_for(gpt2, project_first=SPEC.project_first,  # noqa: E731
                              projector_logits=SPEC.projector_logits).engine
    eng = held()
    b = medlvr.generate(gpt2, _prompt(), spec=SPEC, max_new_tokens=2)
    assert eng is not None and held() is eng and torch.equal(a.tokens, b.tokens)


def test_patch_routes_latent_prompts_only(gpt2):
    import copy
    m = copy.deepcopy(gpt2)
    plain = {"input_ids": torch.tensor([[11, 12, 13]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    hf_before = m.generate(**plain, max_new_tokens=3, do_sample=False, pad_token_id=0)
    medlvr.patch(m, SPEC)
    assert torch.equal(m.generate(**plain, max_new_tokens=3, do_sample=False, pad_token_id=0), hf_before)
    seq = m.generate(**_prompt(), max_new_tokens=3, eos_token_id=EOS)
    want = medlvr.generate(gpt2, _prompt(), spec=SPEC, max_new_tokens=3, stop_ids=[EOS])
    assert torch.equal(seq, want.sequences)
    full = m.generate(**_prompt(), max_new_tokens=3, eos_token_id=EOS, return_dict_in_generate=True)
    assert torch.equal(full.latents, want.latents)
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not supported"):
        m.generate(**_prompt(), max_new_tokens=3, num_beams=2)


def test_custom_generate_callable(gpt2):
    seq = gpt2.generate(**_prompt(), max_new_tokens=3, eos_token_id=EOS, pad_token_id=0,
                        custom_generate=medlvr.custom_generate(SPEC))
    want = medlvr.generate(gpt2, _prompt(), spec=SPEC, max_new_tokens=3, stop_ids=[EOS])
    assert torch.equal(seq, want.sequences)
