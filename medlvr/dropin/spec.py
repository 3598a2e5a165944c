"""LatentSpec: one latent-reasoning system's conventions, so its model runs on the engine.

A spec says which tokens open and close the latent segment, where the latents go, how many
steps run and what ends them, and what maps a hidden state to the next latent. Presets
state the conventions of the public systems as issue 15's table reads them from their
code (docs/dropin.md says which details come from there and which are medlvr's guesses).

    spec = LatentSpec.preset("coconut")                 # or LatentSpec(start_token=..., ...)
    ids = spec.resolve(tokenizer)                       # names -> ids, clear error if absent
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from medlvr.reference.exit_rules import EXIT_SCOPES, EXITS

PLACEMENTS = ("after_start", "placeholders")
Token = int | str


@dataclass(frozen=True)
class LatentSpec:
    """How a system runs its latent segment.

    start_token / end_token: ids or token names (resolved through the tokenizer). The
        prompt's latent segment opens after start_token; end_token is fed after it.
    placement: "after_start": the prompt ends with start_token and the latents follow it
        (medlvr, LVR, Monet, Mirage); "placeholders": the prompt holds ``latent_token``
        placeholders after start_token (optionally closed by end_token), which the latents
        replace one for one (Coconut).
    exit: an engine exit rule ("fixed", "cosine", "stop_logit", "end_distance", "count");
        "count" runs as many steps as the prompt holds placeholders. max_steps: k_max
        (None with "count": the largest count of the batch). exit_threshold: the rule's
        threshold (None: its default, docs/engine.md). exit_scope: "sample" or "batch".
    projector: callable hidden -> latent, or None (the model's ``latent_projector`` if it
        has one, else the identity). end_embedding: for "end_distance", a (D,) tensor or the
        name of a model attribute holding it (LVR's learned end embedding).
    require_start: a prompt without start_token is an error (else start_token is appended).
    """

    name: str = "custom"
    start_token: Token = "<|latent_start|>"
    end_token: Token = "<|latent_end|>"
    latent_token: Token | None = None
    placement: str = "after_start"
    exit: str = "fixed"
    max_steps: int | None = 8
    exit_threshold: float | None = None
    exit_scope: str = "sample"
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None
    end_embedding: torch.Tensor | str | None = None
    require_start: bool = True

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.exit not in EXITS:
            raise ValueError(f"exit must be one of {EXITS}, got {self.exit!r}")
        if self.exit_scope not in EXIT_SCOPES:
            raise ValueError(f"exit_scope must be one of {EXIT_SCOPES}, got {self.exit_scope!r}")
        if self.placement == "placeholders" and self.latent_token is None:
            raise ValueError("placement='placeholders' needs latent_token (the placeholder the latents replace)")
        if self.exit == "count" and self.placement != "placeholders":
            raise ValueError("exit='count' counts latent_token placeholders: it needs placement='placeholders'")
        if self.max_steps is None and self.exit != "count":
            raise ValueError(f"max_steps must be a positive int for exit={self.exit!r} (None only with 'count')")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 0):
            raise ValueError(f"max_steps must be an int >= 0 or None, got {self.max_steps!r}")
        if self.exit == "end_distance" and self.end_embedding is None:
            raise ValueError("exit='end_distance' needs end_embedding (a (D,) tensor or a model attribute name)")
        for field in ("start_token", "end_token", "latent_token"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, str))):
                raise TypeError(f"{field} must be a token id (int) or a token name (str), got {v!r}")

    def replace(self, **changes) -> "LatentSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **changes) -> "LatentSpec":
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return PRESETS[name].replace(**changes)

    def resolve(self, tokenizer=None, *, vocab_size: int | None = None) -> "ResolvedTokens":
        """Token names -> ids through ``tokenizer`` (a tokenizer or a processor holding one).
        Raises ValueError naming the token when it is not in the tokenizer's vocabulary, or
        an id outside [0, vocab_size)."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        vocab = tok.get_vocab() if tok is not None else None
        ids = {}
        for field in ("start_token", "end_token", "latent_token"):
            v = getattr(self, field)
            if v is None:
                ids[field] = None
                continue
            if isinstance(v, str):
                if vocab is None:
                    raise ValueError(f"spec {self.name!r}: {field} {v!r} is a token name; pass the tokenizer "
                                     "(or processor) to resolve it, or give its id")
                if v not in vocab:
                    raise ValueError(f"spec {self.name!r}: {field} {v!r} is not in the tokenizer's vocabulary "
                                     "(add it with tokenizer.add_tokens and resize the embeddings, or give the "
                                     "id the model was trained with)")
                v = int(vocab[v])
            if vocab_size is not None and not 0 <= v < vocab_size:
                raise ValueError(f"spec {self.name!r}: {field} id {v} is outside the model's vocabulary "
                                 f"[0, {vocab_size})")
            ids[field] = v
        return ResolvedTokens(start=ids["start_token"], end=ids["end_token"], latent=ids["latent_token"])


@dataclass(frozen=True)
class ResolvedTokens:
    start: int
    end: int
    latent: int | None


# The public systems' conventions (issue 15's table; docs/dropin.md marks what is assumed).
PRESETS: dict[str, LatentSpec] = {
    # medlvr's own: <|latent_start|> <|latent_pad|>xK <|latent_end|> (medlvr/train/collate.py).
    "medlvr": LatentSpec(name="medlvr", start_token="<|latent_start|>", end_token="<|latent_end|>",
                         exit="fixed", max_steps=8),
    # Coconut (GPT-2): "<|start-latent|> <|latent|>xn <|end-latent|>"; as many latent steps
    # as the prompt holds <|latent|> tokens; the latent is the last hidden state (post ln_f).
    "coconut": LatentSpec(name="coconut", start_token="<|start-latent|>", end_token="<|end-latent|>",
                          latent_token="<|latent|>", placement="placeholders", exit="count", max_steps=None,
                          require_start=True),
    # LVR (Qwen2.5-VL): ends on <|lvr_end|>, or the latent within 0.02 of a learned end
    # embedding, or fixed steps. The preset takes the end-token rule; the distance rule is
    # .replace(exit="end_distance", end_embedding=...). max_steps is medlvr's choice.
    "lvr": LatentSpec(name="lvr", start_token="<|lvr_start|>", end_token="<|lvr_end|>", exit="stop_logit",
                      max_steps=16),
    # Monet (Qwen2.5-VL): end token 151667 or LATENT_SIZE = 10 steps. The start id 151666
    # is assumed (the id before the end token), check it against your tokenizer.
    "monet": LatentSpec(name="monet", start_token=151666, end_token=151667, exit="stop_logit", max_steps=10),
    # Mirage (Qwen2.5-VL): end token or 8 steps, latent mode global to the batch.
    "mirage": LatentSpec(name="mirage", start_token="<|latent_start|>", end_token="<|latent_end|>",
                         exit="stop_logit", max_steps=8, exit_scope="batch"),
}


def presets() -> list[str]:
    return sorted(PRESETS)

