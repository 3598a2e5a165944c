"""HF generation settings on the drop-in's latent route (medlvr/dropin/decoding.py): honoured
(repetition_penalty above all, from the call or the model's generation_config), refused by
name before anything runs, or ignored with a warning when they cannot change the tokens; and
the settings reported (``decoding_settings``, ``DropinOutput.decoding``).

The outside check: with a spec of 0 latent steps the latent route decodes the same prompt as
HF's own (unpatched) ``generate``, so the two must give the same sequences, the repetition
penalty and Qwen2.5-VL-7B-Instruct's shipped generation_config included.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor

import engine_models as tm
import medlvr
from medlvr.dropin import LatentSpec, decoding, decoding_settings
from medlvr.engine import holder

# Qwen2.5-VL-7B-Instruct's generation_config.json, as the repo ships it
QWEN_7B = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
           "repetition_penalty": 1.05, "temperature": 1e-06, "top_p": 0.001, "top_k": 1,
           "transformers_version": "4.49.0"}
# the same settings with the special ids of the tiny vocabulary
QWEN_TINY = {**QWEN_7B, "bos_token_id": 0, "pad_token_id": 0, "eos_token_id": [2, 3]}
NO_LATENTS = LatentSpec.preset("medlvr", start_token=tm.LATENT_START, end_token=tm.LATENT_END, max_steps=0)
SPEC = LatentSpec.preset("medlvr", start_token=tm.LATENT_START, end_token=tm.LATENT_END, max_steps=3)


@pytest.fixture(scope="module")
def base():
    return tm.qwen2_5_vl()


def _model(base, config=None):
    m = copy.deepcopy(base)
    if config is not None:
        m.generation_config = GenerationConfig(**config)
    return m


def _inputs():
    return tm.left_pad([tm.vl_sample(hw, n, seed=s) for hw, n, s in [((4, 6), 3, 1), (None, 6, 2), ((2, 4), 1, 4)]])


def _patched(base, config=None, spec=NO_LATENTS):
    m = _model(base, config)
    medlvr.patch(m, spec)
    return m


def test_hf_defaults_and_settings_are_transformers_own():
    assert decoding.HF_DEFAULTS == GenerationConfig._get_default_generation_params()
    assert decoding._hf_settings() <= set(decoding.KNOWN_SETTINGS)


def test_qwen_generation_config_is_resolved_not_dropped(base):
    m = _model(base, QWEN_7B)
    got = decoding_settings(m, input_ids=torch.zeros(1, 5, dtype=torch.long))
    assert got == dict(greedy=True, temperature=0.0, top_p=1.0, repetition_penalty=1.05, max_new_tokens=20,
                       stop_ids=[151645, 151643], pad_id=151643, notes=[got["notes"][0]])
    assert got["notes"][0].startswith("top_k=1 with do_sample=True keeps only the argmax")
    assert decoding_settings(m, repetition_penalty=1.3, max_new_tokens=7)["repetition_penalty"] == 1.3


@pytest.mark.parametrize("penalty", [None, 1.05, 1.3])
def test_latent_route_equals_hf_generate_with_the_penalty(base, penalty):
    """0 latent steps: the patched route and HF's own generate decode the same prompt."""
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=[2])
    if penalty is not None:
        kw["repetition_penalty"] = penalty
    m = _patched(base)
    hf = m.medlvr_unpatched_generate(**_inputs(), **kw)
    out = m.generate(**_inputs(), return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, hf)
    assert out.decoding["repetition_penalty"] == (penalty or 1.0) and out.decoding["greedy"]


def test_qwen_generation_config_matches_hf_generate(base):
    """Qwen2.5-VL-7B's shipped settings (do_sample with top_k=1, repetition_penalty 1.05) taken
    from the model's generation_config: what HF generate gives, not plain greedy."""
    m = _patched(base, QWEN_TINY)
    hf = m.medlvr_unpatched_generate(**_inputs(), max_new_tokens=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is ignored here
        out = m.generate(**_inputs(), max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf)
    assert out.decoding["repetition_penalty"] == 1.05 and out.decoding["greedy"]
    # the penalty is applied: the same call at 1.3 (the model's config, overridden by the call) bites
    hf13 = m.medlvr_unpatched_generate(**_inputs(), max_new_tokens=10, repetition_penalty=1.3)
    out13 = m.generate(**_inputs(), max_new_tokens=10, repetition_penalty=1.3)
    plain = m.generate(**_inputs(), max_new_tokens=10, repetition_penalty=1.0)
    assert torch.equal(out13, hf13) and not torch.equal(out13, plain)
    # and a penalty that bites, read from the model's generation_config alone
    strong = _patched(base, {**QWEN_TINY, "repetition_penalty": 1.3})
    assert torch.equal(strong.generate(**_inputs(), max_new_tokens=10), hf13)


def test_penalty_with_latents_equals_direct_generate(base):
    m = _patched(base, QWEN_TINY, spec=SPEC)
    out = m.generate(**_inputs(), max_new_tokens=6, return_dict_in_generate=True)
    want = medlvr.generate(m, _inputs(), spec=SPEC, max_new_tokens=6, repetition_penalty=1.05, stop_ids=[2, 3],
                           pad_id=0)
    assert torch.equal(out.sequences, want.sequences) and torch.equal(out.latents, want.latents)
    assert want.decoding == {**out.decoding, "notes": []}


def test_max_length_and_the_default_budget_are_hf_s(base):
    m = _patched(base)
    inputs = _inputs()
    width = inputs["input_ids"].shape[1]
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=[2])
    for extra in (dict(max_length=width + 4), {}):  # HF's total length; HF's default of 20 new tokens
        hf = m.medlvr_unpatched_generate(**inputs, **kw, **extra)
        assert torch.equal(m.generate(**inputs, **kw, **extra), hf)
    with pytest.raises(ValueError, match="max_length=3 is shorter than the prompt"):
        m.generate(**inputs, max_length=3)


def test_sampling_settings(base):
    m = _patched(base)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = m.generate(**_inputs(), max_new_tokens=4, do_sample=True, top_k=0, temperature=0.7, top_p=0.9,
                     generator=g(), return_dict_in_generate=True)
    assert out.decoding["greedy"] is False and out.decoding["temperature"] == 0.7 and out.decoding["top_p"] == 0.9
    want = medlvr.generate(m, _inputs(), spec=NO_LATENTS, max_new_tokens=4, temperature=0.7, top_p=0.9,
                           generator=g(), stop_ids=[2], pad_id=0)
    assert torch.equal(out.tokens, want.tokens)
    # top_k=1 under do_sample is the argmax; a top_k of at least the vocabulary filters nothing
    greedy = m.generate(**_inputs(), max_new_tokens=4, do_sample=False)
    assert torch.equal(m.generate(**_inputs(), max_new_tokens=4, do_sample=True, top_k=1), greedy)
    assert decoding_settings(m, do_sample=True, top_k=tm.VOCAB, max_new_tokens=4)["greedy"] is False


class _Boost(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


REFUSED = [
    (dict(num_beams=2), r"\['num_beams'\] are not supported.*beam search"),
    (dict(num_return_sequences=2), r"\['num_return_sequences'\]"),
    (dict(no_repeat_ngram_size=2), r"\['no_repeat_ngram_size'\].*n-gram"),
    (dict(min_new_tokens=2), r"\['min_new_tokens'\]"),
    (dict(bad_words_ids=[[5]]), r"\['bad_words_ids'\]"),
    (dict(suppress_tokens=[5]), r"\['suppress_tokens'\]"),
    (dict(encoder_repetition_penalty=1.2), r"\['encoder_repetition_penalty'\]"),
    (dict(guidance_scale=2.0), r"\['guidance_scale'\]"),
    (dict(forced_eos_token_id=2), r"\['forced_eos_token_id'\]"),
    (dict(do_sample=True), r"\['top_k'\].*top_k=50 \(HF generate's default with do_sample=True\)"),
    (dict(do_sample=True, top_k=5), r"\['top_k'\].*top_k=5:"),
    (dict(do_sample=True, top_k=0, typical_p=0.5), r"\['typical_p'\]"),
    (dict(do_sample=True, top_k=0, min_p=0.1), r"\['min_p'\]"),
    (dict(do_sample=True, top_k=0, temperature=0.0), r"temperature must be a finite float > 0 with do_sample"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a finite float > 0"),
    (dict(repetition_penalty=float("nan")), r"repetition_penalty must be a finite float > 0"),
    (dict(logits_processor=[_Boost()]), r"\['logits_processor'\].*_Boost"),
    (dict(num_beams=3, no_repeat_ngram_size=2), r"\['no_repeat_ngram_size', 'num_beams'\]"),
]


@pytest.mark.parametrize("kw,match", REFUSED, ids=[str(sorted(k)) for k, _ in REFUSED])
def test_unsupported_settings_are_refused_by_name_before_anything_runs(base, kw, match):
    m = _patched(base)
    with pytest.raises(ValueError, match=match):
        m.generate(**_inputs(), max_new_tokens=3, **kw)
    assert holder._HOLDERS.get(m) is None  # no engine was built
    with pytest.raises(ValueError, match=match):
        decoding_settings(m, max_new_tokens=3, **kw)


def test_settings_from_the_generation_config_are_refused_too(base):
    m = _patched(base, {"no_repeat_ngram_size": 3, "eos_token_id": 2})
    with pytest.raises(ValueError, match=r"\['no_repeat_ngram_size'\].*no_repeat_ngram_size=3"):
        m.generate(**_inputs(), max_new_tokens=3)
    m = _patched(base)
    with pytest.raises(ValueError, match=r"\['no_repeat_ngram_size'\]"):
        m.generate(**_inputs(), max_new_tokens=3, generation_config=GenerationConfig(no_repeat_ngram_size=3))
    # the call wins over the config: None and the neutral value switch it off
    assert torch.equal(m.generate(**_inputs(), max_new_tokens=3, no_repeat_ngram_size=0,
                                  generation_config=GenerationConfig(no_repeat_ngram_size=3)),
                       m.generate(**_inputs(), max_new_tokens=3))


@pytest.mark.parametrize("kw", [dict(renormalize_logits=True), dict(length_penalty=2.0), dict(output_scores=True)])
def test_settings_that_cannot_change_the_tokens_are_ignored_with_a_warning(base, kw):
    m = _patched(base)
    plain = m.generate(**_inputs(), max_new_tokens=4)
    name = next(iter(kw))
    with pytest.warns(UserWarning, match=rf"medlvr latent route: {name}=.* is ignored"):
        out = m.generate(**_inputs(), max_new_tokens=4, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, plain)
    assert any(n.startswith(f"{name}=") for n in out.decoding["notes"])


def test_custom_generate_honours_the_penalty(base):
    """Text-only prompts: transformers 5.25 runs the vision tower before it calls a custom_generate
    and hands it mm_encoder_outputs, not pixel_values, which the engine's prefill does not take."""
    m = _model(base)
    inputs = tm.left_pad([tm.vl_sample(None, n, seed=s) for n, s in ((3, 1), (7, 2))])
    kw = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=[2], repetition_penalty=1.3)
    got = m.generate(**inputs, custom_generate=medlvr.custom_generate(NO_LATENTS), **kw)
    assert torch.equal(got, m.generate(**inputs, **kw))  # HF's own generate, no latents
    with pytest.raises(ValueError, match=r"\['logits_processor'\].*_Boost"):
        m.generate(**inputs, custom_generate=medlvr.custom_generate(NO_LATENTS), logits_processor=[_Boost()], **kw)
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size=2: n-gram blocking"):
        m.generate(**inputs, custom_generate=medlvr.custom_generate(NO_LATENTS), no_repeat_ngram_size=2, **kw)


def test_direct_generate_reports_its_settings(base):
    m = _model(base)
    out = medlvr.generate(m, _inputs(), spec=SPEC, max_new_tokens=3, temperature=0.5, top_p=0.8,
                          repetition_penalty=1.2, stop_ids=[2], generator=torch.Generator().manual_seed(0))
    assert out.decoding == dict(greedy=False, temperature=0.5, top_p=0.8, repetition_penalty=1.2, max_new_tokens=3,
                                stop_ids=[2], pad_id=2, notes=[])
    with pytest.raises(ValueError, match="repetition_penalty must be a finite float > 0"):
        medlvr.generate(m, _inputs(), spec=SPEC, repetition_penalty=-1.0)
