"""A request to the engine: its arguments, checked once, and its outputs.

``LatentEngine.generate`` checks everything up front and hands the checked values to its
three phases; each public phase checks only its own. Every error names the argument and
what was expected."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from medlvr.engine.state import MAX_STOP_IDS
from medlvr.engine import exit_rules

def as_mapping(batch) -> Mapping[str, torch.Tensor]:
    """``batch``, checked to be a mapping of model inputs (a medlvr.train collate ``Batch``
    gives one by ``batch.model_inputs()``)."""
    if isinstance(batch, Mapping):
        return batch
    raise TypeError(f"batch must be a mapping of model inputs (input_ids, attention_mask, ...; "
                    f"a collate Batch: batch.model_inputs()), got {type(batch).__name__}")


def checked_batch(batch, engine, group_size: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """(the batch as a dict on the engine's device, its longest unpadded prompt), checked by
    the model's adapter and against the engine's capacity (max_batch, max_len; with
    ``group_size``, grouped generation: prompts x group_size rows <= max_batch, prompts <=
    max_prompts, the prompt in max_prompt_len). The longest prompt is the call's one read
    of the prompt lengths from the device (a host sync); the phases take it from here."""
    max_batch, device = engine.max_batch, engine.device
    max_len = engine.max_len if group_size is None else engine.max_prompt_len
    batch = as_mapping(batch)
    engine.adapter.check_batch(batch)
    B = batch["input_ids"].shape[0]
    if group_size is not None:
        positive_int("group_size", group_size)
        if engine.max_prompts == 0:
            raise ValueError("group_size needs an engine built with max_prompts > 0 (the shared prompt cache)")
        if B < 1 or B > engine.max_prompts or B * group_size > max_batch:
            raise ValueError(f"grouped batch: prompts must be in [1, max_prompts={engine.max_prompts}] and "
                             f"prompts x group_size <= max_batch={max_batch}, got {B} x {group_size}")
    elif B < 1 or B > max_batch:
        raise ValueError(f"batch size must be in [1, max_batch={max_batch}], got {B}")
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    n_max = int(batch["attention_mask"].long().sum(-1).max())
    if n_max > max_len or batch["input_ids"].shape[1] > max_len:
        raise ValueError(f"prompt of {batch['input_ids'].shape[1]} tokens ({n_max} unpadded) does not fit "
                         f"{'max_len' if group_size is None else 'max_prompt_len'} {max_len}")
    return batch, n_max


def positive_int(name: str, value) -> int:
    """``value``, checked to be an int >= 1 (ValueError naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value) -> int:
    """``value``, checked to be an int >= 0 (ValueError naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def token_id(name: str, value, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")
    return value


def check_repetition_penalty(value) -> float:
    """``value``, checked to be a finite float > 0 (ValueError naming repetition_penalty
    otherwise); 1.0 is no penalty (medlvr/engine/sampling.py: HF's semantics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"repetition_penalty must be a finite float > 0 (1.0: no penalty), got {value!r}")
    return float(value)


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator must be on the model's device type {device.type}, got {generator.device}")


# first_token value: feed, per row, the token the latent segment left (exit rule
# after_exit="mirage", medlvr/engine/exit_rules.py).
FROM_SEGMENT = "segment"


def text_feeds(max_new_tokens: int, first_token: int | str | None) -> int:
    """Cache positions a text decode writes: the first token (if fed) and every sampled
    token but the last."""
    if max_new_tokens == 0:
        return 0
    return max_new_tokens if first_token is not None else max_new_tokens - 1


@dataclass(frozen=True)
class SegmentParams:
    """A checked latent segment: ``rule`` its exit rule (medlvr/engine/exit_rules.py:
    mode, threshold, scope, what is fed after it, ...), the end token id and the latent
    noise."""

    k_max: int
    rule: exit_rules.ExitRule
    latent_end_id: int | None
    noise_std: float

    @property
    def mode(self) -> str:
        return self.rule.mode

    @property
    def scope(self) -> str:
        return self.rule.scope

    @classmethod
    def checked(cls, k_max, *, latent_end_id, latent_noise_std, vocab: int, has_stop_head: bool,
                batch: int | None = None, hidden_size: int | None = None, **exit_kw) -> "SegmentParams":
        """exit_kw: the exit rule's arguments (exit_rules.checked: exit, exit_threshold,
        exit_scope, exit_distance, exit_distance_on, exit_check_start, after_exit,
        latent_pad_id, end_embedding, latent_counts)."""
        non_negative_int("k_max", k_max)
        rule = exit_rules.checked(k_max, latent_end_id=latent_end_id, batch=batch, hidden_size=hidden_size,
                                  vocab=vocab, has_stop_head=has_stop_head, **exit_kw)
        std = latent_noise_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise ValueError(f"latent_noise_std must be a float >= 0, got {std!r}")
        return cls(k_max=k_max, rule=rule, latent_end_id=latent_end_id, noise_std=float(std))


@dataclass(frozen=True)
class TextParams:
    """A checked text decode. temperature 0 is greedy. first_token: an id fed to every
    row, None (the first token is sampled from the current hidden state) or FROM_SEGMENT.
    stop_first: the first sampled token may stop a row (False: Coconut's generate appends
    its first token without the eos test). repetition_penalty: HF's, over the ids in each
    row's cache (its prompt and every token fed since; latents have no id); 1.0: off."""

    max_new_tokens: int
    first_token: int | str | None
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]
    pad_id: int
    return_logits: bool
    stop_first: bool = True
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def use_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def use_top_p(self) -> bool:
        return not self.greedy and self.top_p < 1.0

    @property
    def feeds(self) -> int:
        return text_feeds(self.max_new_tokens, self.first_token)

    @classmethod
    def checked(cls, max_new_tokens, *, first_token, temperature, top_p, stop_ids: Sequence[int], pad_id,
                return_logits: bool, vocab: int, stop_first: bool = True,
                repetition_penalty: float = 1.0) -> "TextParams":
        non_negative_int("max_new_tokens", max_new_tokens)
        penalty = check_repetition_penalty(repetition_penalty)
        if first_token is not None and first_token != FROM_SEGMENT:
            token_id("first_token", first_token, vocab)
        if not isinstance(stop_first, bool):
            raise ValueError(f"stop_first must be a bool, got {stop_first!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
        stops = stop_ids.tolist() if isinstance(stop_ids, torch.Tensor) else list(stop_ids)
        if len(stops) > MAX_STOP_IDS:
            raise ValueError(f"stop_ids may hold at most {MAX_STOP_IDS} ids, got {len(stops)}")
        for s in stops:
            token_id("stop_ids entries", s, vocab)
        if pad_id is not None:
            token_id("pad_id", pad_id, vocab)
        pad = pad_id if pad_id is not None else (stops[0] if stops else 0)
        return cls(max_new_tokens=max_new_tokens, first_token=first_token, temperature=float(temperature),
                   top_p=float(top_p), stop_ids=tuple(int(s) for s in stops), pad_id=int(pad),
                   return_logits=bool(return_logits), stop_first=stop_first, repetition_penalty=penalty)


@dataclass
class LatentSegment:
    """latents (B, K, D): the inputs z_t fed at latent step t, zero from a sample's exit
    on. latent_hidden (B, K, D): the post-norm hidden states h_{t-1} that produced them
    (equal to latents without a projector). num_latent (B): steps each sample ran."""

    latents: torch.Tensor
    latent_hidden: torch.Tensor
    num_latent: torch.Tensor


@dataclass
class TextOutput:
    tokens: torch.Tensor  # (B, T) int64, pad after the stop token
    token_logprobs: torch.Tensor  # (B, T) fp32, 0 after the stop token
    text_lengths: torch.Tensor  # (B,) tokens generated, the stop token included
    logits: torch.Tensor | None = None  # (B, T, V) fp32 when asked for, 0 after the stop


@dataclass
class GenerateOutput:
    """The phases' outputs together (docs/engine.md). token_logprobs are log-probs of the
    sampled tokens under log_softmax(logits / temperature) (temperature 0: under
    log_softmax(logits))."""

    latents: torch.Tensor
    latent_hidden: torch.Tensor
    num_latent: torch.Tensor
    tokens: torch.Tensor
    token_logprobs: torch.Tensor
    text_lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    logits: torch.Tensor | None = None
