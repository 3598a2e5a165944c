"""How an HF-style ``generate`` call's settings map onto medlvr's decoding (docs/dropin.md).

``patch``'d ``model.generate(...)`` and ``custom_generate`` take HF's generation settings from
the call, a ``generation_config`` and the model's ``generation_config``, with HF's priority
(transformers 5.x ``_prepare_generation_config``: call > passed config > model's config > HF's
global defaults; a setting passed as None in the call is None). Every setting that changes
the tokens HF would produce is either honoured or refused here, by name, before anything
runs; settings that cannot change the tokens are ignored with a one-line warning when set.

Honoured: do_sample, temperature, top_p, repetition_penalty, max_new_tokens (else max_length,
counted as HF counts it: prompt width included), eos_token_id, pad_token_id; top_k when it
does not filter (None, 0, >= the vocabulary) and top_k=1 with do_sample, which keeps only the
argmax: that is decoded greedily (HF samples among exactly tied maxima; medlvr takes the first).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from medlvr.engine.request import check_repetition_penalty

# transformers 5.x GenerationConfig._get_default_generation_params(), the values generate()
# uses for settings nobody set (tests/dropin/test_decoding.py checks this copy against it).
HF_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "early_stopping": False,
    "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4, "assistant_lookbehind": 10,
    "target_lookbehind": 10, "num_beam_groups": 1, "diversity_penalty": 0.0,
}

HONOURED = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "max_length",
            "eos_token_id", "pad_token_id")

# Settings that change the tokens and that medlvr does not implement: refused when set (to a
# value other than None / False / HF's default / the listed neutral values).
REFUSED: dict[str, tuple[tuple, str]] = {
    "num_beams": ((1,), "beam search (medlvr decodes one sequence per prompt)"),
    "num_return_sequences": ((1,), "several sequences per prompt (repeat the prompt rows instead)"),
    "penalty_alpha": ((0,), "contrastive search"),
    "dola_layers": ((), "DoLa decoding"),
    "constraints": ((), "constrained beam search"),
    "force_words_ids": ((), "constrained beam search"),
    "no_repeat_ngram_size": ((0,), "n-gram blocking"),
    "encoder_no_repeat_ngram_size": ((0,), "n-gram blocking of the prompt's n-grams"),
    "encoder_repetition_penalty": ((1.0,), "the inverse penalty on the prompt's ids"),
    "bad_words_ids": ((), "banned token sequences"),
    "sequence_bias": ((), "sequence biases"),
    "suppress_tokens": ((), "suppressed tokens"),
    "begin_suppress_tokens": ((), "suppressed first tokens"),
    "forced_bos_token_id": ((), "a forced first token"),
    "forced_eos_token_id": ((), "a forced last token"),
    "exponential_decay_length_penalty": ((), "the length-dependent eos boost"),
    "min_length": ((0,), "a minimum length (eos suppressed before it)"),
    "min_new_tokens": ((0,), "a minimum length (eos suppressed before it)"),
    "guidance_scale": ((1, 1.0), "classifier-free guidance"),
    "watermarking_config": ((), "watermarking"),
    "stop_strings": ((), "stop strings"),
    "max_time": ((), "a time budget"),
    "token_healing": ((), "token healing (it rewrites the prompt's last tokens)"),
}
# Refused only when sampling (HF applies them only with do_sample=True).
REFUSED_SAMPLING: dict[str, tuple[tuple, str]] = {
    "min_p": ((), "min-p filtering"),
    "top_h": ((), "top-h filtering"),
    "typical_p": ((1.0,), "typical sampling"),
    "epsilon_cutoff": ((0.0,), "epsilon sampling"),
    "eta_cutoff": ((0.0,), "eta sampling"),
}
# Settings that cannot change the tokens here: a one-line warning when set.
IGNORED: dict[str, str] = {
    "renormalize_logits": "it normalises the processed scores, which leaves the tokens as they are",
    "remove_invalid_values": "it changes only nan/inf logits",
    "length_penalty": "beam search only (num_beams=1)",
    "early_stopping": "beam search only (num_beams=1)",
    "num_beam_groups": "beam search only (num_beams=1)",
    "diversity_penalty": "beam search only (num_beams=1)",
    "output_scores": "not returned (DropinOutput has token_logprobs)",
    "output_logits": "not returned (DropinOutput has token_logprobs)",
    "output_attentions": "not returned",
    "output_hidden_states": "not returned (DropinOutput has latents)",
    "cache_implementation": "medlvr uses its own static cache",
    "prompt_lookup_num_tokens": "speculative decoding: medlvr does not speculate",
    "assistant_early_exit": "speculative decoding: medlvr does not speculate",
    "use_mtp": "speculative decoding: medlvr does not speculate",
    "streamer": "the tokens are not streamed",
}
# Settings of no consequence for the tokens of a decoder-only model given a prompt (or read
# only with an assistant model, which the latent route refuses): not looked at.
NOT_READ = ("use_cache", "bos_token_id", "decoder_start_token_id", "is_assistant", "num_assistant_tokens",
            "num_assistant_tokens_schedule", "assistant_confidence_threshold", "max_matching_ngram_size",
            "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "speculation_type",
            "compile_config", "disable_compile", "continuous_batching_config", "low_memory", "prefill_chunk_size",
            "cache_config", "max_cache_len", "return_dict_in_generate", "_from_model_config", "transformers_version",
            "synced_gpus")

_PROCESSORS_OK = ("RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopPLogitsWarper",
                  "TopKLogitsWarper")
_CRITERIA_OK = ("MaxLengthCriteria", "EosTokenCriteria")


@dataclass(frozen=True)
class Decoding:
    """The settings medlvr decodes with (temperature 0: greedy). stop_ids: the resolved
    eos_token_id (none: no stop id, as in HF). pad_id None: the first stop id (HF's fallback
    too), else 0. notes: how HF settings were mapped or which were ignored, one line each."""

    temperature: float
    top_p: float
    repetition_penalty: float
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _off(value, neutral: tuple, default) -> bool:
    return value is None or value is False or any(value == n for n in (*neutral, default) if n is not None)


def _ids(value, name: str) -> tuple[int, ...] | None:  # eos_token_id: an id, a list or a tensor
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else list(value.tolist() if hasattr(value, "tolist") else value)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"{name} must be a token id or a list of them, got {value!r}")
    return tuple(ids)


def from_hf(kwargs: Mapping[str, Any], *, model_config=None, vocab: int, width: int | None,
            resolved: bool = False, warn: Callable[[str], None] | None = None) -> Decoding:
    """The Decoding of an HF-style generate call. kwargs: the call's keywords (its
    ``generation_config`` included); model_config: the model's generation_config; vocab: the
    logits' size; width: the caller's input_ids width (HF's max_length counts it).
    resolved=True: ``generation_config`` is already HF's merged one (what HF hands a
    ``custom_generate`` callable, with its prepared ``logits_processor`` and
    ``stopping_criteria``), read as it is. Raises ValueError naming every setting refused."""
    warn = warn or (lambda msg: warnings.warn(msg, UserWarning, stacklevel=4))
    passed = kwargs.get("generation_config")
    configs = [c for c in ((passed,) if resolved else (passed, model_config)) if c is not None]

    def given(key: str) -> bool:
        return (key in kwargs and not resolved) or any(getattr(c, key, None) is not None for c in configs)

    def get(key: str):
        if key in kwargs and not resolved:
            return kwargs[key]
        for cfg in configs:
            if getattr(cfg, key, None) is not None:
                return getattr(cfg, key)
        return None if resolved else HF_DEFAULTS.get(key)

    sample = bool(get("do_sample"))
    rules = {**REFUSED, **(REFUSED_SAMPLING if sample else {})}
    refused = {k: f"{k}={get(k)!r}: {why}" for k, (neutral, why) in rules.items()
               if not _off(get(k), neutral, HF_DEFAULTS.get(k))}
    known = set(KNOWN_SETTINGS)
    for cfg in configs:  # a setting of a newer transformers that this table does not know yet
        for k in _hf_settings() - known:
            if not _off(getattr(cfg, k, None), (), HF_DEFAULTS.get(k)):
                refused[k] = f"{k}={getattr(cfg, k)!r}: a generation setting medlvr does not know"
    notes = []
    top_k = get("top_k")
    if sample and top_k not in (None, 0) and not (isinstance(top_k, int) and top_k >= vocab):
        if top_k == 1:
            notes.append("top_k=1 with do_sample=True keeps only the argmax: decoded greedily (temperature and "
                         "top_p cannot change it)")
        else:
            default = "" if given("top_k") else " (HF generate's default with do_sample=True)"
            refused["top_k"] = (f"top_k={top_k!r}{default}: top-k filtering (medlvr samples from the whole "
                                "distribution or its top_p nucleus): pass top_k=0 or None to sample without it, "
                                "1 for greedy")
    for name, ok in (("logits_processor", _PROCESSORS_OK), ("stopping_criteria", _CRITERIA_OK)):
        # resolved: HF's prepared lists, made from the settings checked here (plus the caller's own)
        extra = sorted({type(p).__name__ for p in (kwargs.get(name) or ()) if not resolved
                        or type(p).__name__ not in ok})
        if extra:
            refused[name] = f"{name} {extra}: they cannot run inside medlvr's engine"
    if refused:
        raise ValueError(f"generation settings {sorted(refused)} are not supported on medlvr's latent route: "
                         + "; ".join(refused[k] for k in sorted(refused)))
    for key, why in IGNORED.items():
        value = kwargs.get(key) if key == "streamer" else get(key)
        if not _off(value, (), HF_DEFAULTS.get(key)):
            notes.append(f"{key}={value!r} ignored: {why}")
            warn(f"medlvr latent route: {key}={value!r} is ignored ({why})")
    greedy = not sample or top_k == 1
    temperature, top_p = 0.0, 1.0
    if not greedy:
        t = get("temperature")
        t = 1.0 if t is None else t
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ValueError(f"temperature must be a finite float > 0 with do_sample=True (HF refuses it too), "
                             f"got {t!r}; pass do_sample=False for greedy decoding")
        p = get("top_p")
        p = 1.0 if p is None else p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a float in (0, 1] with do_sample=True, got {p!r}")
        temperature, top_p = float(t), float(p)
    penalty = get("repetition_penalty")
    penalty = check_repetition_penalty(1.0 if penalty is None else penalty)
    return Decoding(temperature=temperature, top_p=top_p, repetition_penalty=penalty,
                    max_new_tokens=_budget(get, given, resolved, width),
                    stop_ids=_ids(get("eos_token_id"), "eos_token_id") or (), pad_id=get("pad_token_id"),
                    notes=tuple(notes))


def _budget(get, given, resolved: bool, width: int | None) -> int:
    """max_new_tokens, else HF's max_length less the prompt width (HF counts the prompt in it),
    else HF's default of 20 new tokens."""
    n = get("max_new_tokens")
    if n is None:
        if not (resolved or given("max_length")) or get("max_length") is None:
            return HF_DEFAULTS["max_length"]
        if width is None:
            raise ValueError("max_length counts the prompt: pass input_ids (or max_new_tokens)")
        n = get("max_length") - width
        if n < 0:
            raise ValueError(f"max_length={get('max_length')} is shorter than the prompt ({width} tokens); "
                             "pass max_new_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {n!r}")
    return n


KNOWN_SETTINGS = (*HONOURED, *REFUSED, *REFUSED_SAMPLING, *IGNORED, *NOT_READ)


@functools.lru_cache(maxsize=1)
def _hf_settings() -> frozenset[str]:
    """The attribute names of transformers' GenerationConfig (its settings)."""
    from transformers import GenerationConfig

    return frozenset(k for k in vars(GenerationConfig()) if not k.startswith("_"))
