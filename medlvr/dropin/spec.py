"""LatentSpec: one latent-reasoning system's conventions, so its model runs on the engine.

A spec says which tokens open and close the latent segment, where the latents go, how many
steps run and what ends them, what is fed after them, and what maps a hidden state to the
next latent. Each preset equals its system's own loop (medlvr/reference/dropin_loops.py
cites the code; tests/dropin/test_presets.py checks it); where medlvr differs it is an
option whose default is the original's (docs/dropin.md lists them).

    spec = LatentSpec.preset("coconut")                 # or LatentSpec(start_token=..., ...)
    ids = spec.resolve(tokenizer)                       # names -> ids, clear error if absent
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from medlvr.engine import exit_rules

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
    exit, exit_threshold, exit_scope, exit_distance, exit_distance_on, exit_check_start,
        after_exit: the exit rule and what follows it (medlvr/engine/exit_rules.py, where
        each is defined with its default). "count" runs as many steps as the prompt holds
        placeholders. latent_pad_token: the id after_exit="mirage" writes (Mirage's
        <|latent_pad|>).
    max_steps: k_max, the system's own step cap. None: the system has none; with "count" the
        largest count of the batch, else ``step_limit``. Never ``max_new_tokens``: the text
        budget does not end a latent segment (LVR's loop keeps a row in latent mode past its
        token budget until the end token).
    step_limit: medlvr's safety cap for max_steps=None (a data-dependent exit): the static
        step budget of the captured segment, which runs all of its steps. A row that runs all
        of them is reported (a warning naming step_limit and the rows; DropinOutput.
        latent_capped), since the original would have gone on; raise it with
        ``spec.replace(step_limit=...)``.
    projector: callable hidden -> latent, or None (the model's ``latent_projector`` if it
        has one, else the identity). project_first=False: the first latent is not projected;
        projector_logits=True: the exit tests and the first answer token read the projected
        state (LVR's lvr_head: ``projector=model.lvr_head, project_first=False,
        projector_logits=True``). end_embedding: for "end_distance", a (D,) tensor or the
        name of a model attribute holding it (LVR's ``lvr_latent_end_emb``).
    start_embedded: the start token is run as a token (False: Monet, whose runner feeds
        the hidden state that sampled <start> at <start>'s own position).
    stop_first: the first answer token may end the answer (False: Coconut's generate
        appends its first token without the eos test).
    require_start: a prompt without start_token is an error (else start_token is appended).
    """

    name: str = "custom"
    start_token: Token = "<|latent_start|>"
    end_token: Token = "<|latent_end|>"
    latent_token: Token | None = None
    placement: str = "after_start"
    exit: str = "fixed"
    max_steps: int | None = 8
    step_limit: int = 256
    exit_threshold: float | None = None
    exit_scope: str = "sample"
    exit_distance: str = "mse"
    exit_distance_on: str = "fed"
    exit_check_start: bool = False
    after_exit: str = "end_token"
    latent_pad_token: Token | None = None
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None
    project_first: bool = True
    projector_logits: bool = False
    end_embedding: torch.Tensor | str | None = None
    require_start: bool = True
    start_embedded: bool = True
    stop_first: bool = True

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        exit_rules.check_options(exit=self.exit, exit_threshold=self.exit_threshold, exit_scope=self.exit_scope,
                                 exit_distance=self.exit_distance, exit_distance_on=self.exit_distance_on,
                                 exit_check_start=self.exit_check_start, after_exit=self.after_exit,
                                 latent_pad_id=self.latent_pad_token)
        if self.placement == "placeholders" and self.latent_token is None:
            raise ValueError("placement='placeholders' needs latent_token (the placeholder the latents replace)")
        if self.exit == "count" and self.placement != "placeholders":
            raise ValueError("exit='count' counts latent_token placeholders: it needs placement='placeholders'")
        for field in ("start_embedded", "stop_first", "require_start", "project_first", "projector_logits"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if not self.start_embedded and self.placement != "after_start":
            raise ValueError("start_embedded=False needs placement='after_start'")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 0):
            raise ValueError(f"max_steps must be an int >= 0 or None, got {self.max_steps!r}")
        if isinstance(self.step_limit, bool) or not isinstance(self.step_limit, int) or self.step_limit < 1:
            raise ValueError(f"step_limit must be an int >= 1, got {self.step_limit!r}")
        if self.exit == "end_distance" and self.end_embedding is None:
            raise ValueError("exit='end_distance' needs end_embedding (a (D,) tensor or a model attribute name)")
        for field in ("start_token", "end_token", "latent_token", "latent_pad_token"):
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
        for field in ("start_token", "end_token", "latent_token", "latent_pad_token"):
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
        return ResolvedTokens(start=ids["start_token"], end=ids["end_token"], latent=ids["latent_token"],
                              latent_pad=ids["latent_pad_token"])


@dataclass(frozen=True)
class ResolvedTokens:
    start: int
    end: int
    latent: int | None
    latent_pad: int | None = None


# The public systems' loops (medlvr/reference/dropin_loops.py cites each; docs/dropin.md).
PRESETS: dict[str, LatentSpec] = {
    # medlvr's own: <|latent_start|> <|latent_pad|>xK <|latent_end|> (medlvr/data/collate.py).
    "medlvr": LatentSpec(name="medlvr", start_token="<|latent_start|>", end_token="<|latent_end|>",
                         exit="fixed", max_steps=8),
    # Coconut (GPT-2, coconut.py): "<|start-latent|> <|latent|>xn <|end-latent|>" (run.py adds
    # the three tokens); n latent steps per row, each the last hidden state (post ln_f);
    # generate appends its first token without the eos test.
    "coconut": LatentSpec(name="coconut", start_token="<|start-latent|>", end_token="<|end-latent|>",
                          latent_token="<|latent|>", placement="placeholders", exit="count", max_steps=None,
                          stop_first=False),
    # LVR (Qwen2.5-VL, src/model/qwen_lvr_model.py), generate's default (_lvr_deocding):
    # leave when <|lvr_end|> is the next token, tested at <|lvr_start|> too; no step cap, and
    # no token budget either (a row in latent mode stays unfinished): step_limit bounds it.
    "lvr": LatentSpec(name="lvr", start_token="<|lvr_start|>", end_token="<|lvr_end|>", exit="stop_logit",
                      exit_check_start=True, max_steps=None),
    # LVR decoding_strategy="latent": MSE of the fed latent to lvr_latent_end_emb < 0.02,
    # then the model's own next token; lvr_steps caps it (16 in the function's signature).
    "lvr-latent": LatentSpec(name="lvr-latent", start_token="<|lvr_start|>", end_token="<|lvr_end|>",
                             exit="end_distance", end_embedding="lvr_latent_end_emb", after_exit="model",
                             max_steps=16),
    # LVR decoding_strategy="steps" (evaluation/evaluation.py: 4, 8 or 16), then the model's
    # own next token.
    "lvr-steps": LatentSpec(name="lvr-steps", start_token="<|lvr_start|>", end_token="<|lvr_end|>", exit="fixed",
                            after_exit="model", max_steps=8),
    # Monet (Qwen2.5-VL, the vLLM runner): LATENT_START_ID 151666 / LATENT_END_ID 151667
    # (RL/monet_rl_patch.py), LATENT_SIZE 10; <start> is not embedded; the end id is forced.
    "monet": LatentSpec(name="monet", start_token=151666, end_token=151667, exit="stop_logit", max_steps=10,
                        start_embedded=False),
    # Mirage (Qwen2.5-VL, its patched _sample): one latent mode per batch, left when the count
    # of end-token argmaxes reaches the batch size (tested at <start> too) or after 8 steps.
    "mirage": LatentSpec(name="mirage", start_token="<|latent_start|>", end_token="<|latent_end|>",
                         latent_pad_token="<|latent_pad|>", exit="stop_logit", max_steps=8, exit_scope="batch",
                         exit_check_start=True, after_exit="mirage"),
}


def presets() -> list[str]:
    return sorted(PRESETS)

