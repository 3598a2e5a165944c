"""The latent segment's exit rules, each defined once for production: its name, its
parameters with their checks and defaults, and the stop test that the engine's captured
step (medlvr/engine/step.py), the plain-HF loop (medlvr/engine/hf_loop.py), the engine's
requests (medlvr/engine/request.py) and the drop-in presets (medlvr/dropin/spec.py) call.

The tests are batched tensor math with no host sync, so that they run inside a captured
CUDA graph; their row-by-row spec is medlvr/reference/exit_rules.py, checked against this
module by tests/engine/test_exit_rules_spec.py. It imports nothing from medlvr. Adding a
rule means a branch in ``checked`` and one in ``stop_mask`` here, its statement in the
spec, plus its test.

Rules (per row, tested after latent step t on its output h_t unless said otherwise):

- "fixed": no test; every row runs k_max steps.
- "cosine": cos(mu_{t+1}, mu_t) > threshold (default 0.99): successive latent means
  converged; mu_{t+1} is not fed.
- "stop_logit": the model would emit the end token next. With a ``latent_stop_head``:
  its logit > threshold (default 0); else lm_head(h_t)[end] > threshold, or, with no
  threshold, end is the argmax of lm_head(h_t) (LVR, Monet, Mirage).
- "end_distance" (LVR): d(v, e_end) < threshold (default LVR's 0.02), e_end a learned
  (D,) end embedding. ``distance``: "mse" = mean_i (v_i - e_i)^2 (LVR's MSELoss(reduction=
  "none").mean(-1)) or "l2" = ||v - e||_2. ``distance_on``: "fed" = v is z_t, the latent just
  fed, so the segment ends after feeding it (LVR); "next" = v is mu_{t+1}, which is then
  not fed.
- "count" (Coconut): row b runs exactly counts[b] steps (its prompt's placeholders).

``check_start``: the test also runs on h_{-1}, the start token's own output, before any
latent is fed, so a row can run 0 steps (LVR's end-token loop and Mirage test the token
sampled at <start>). Only "stop_logit" has a meaning there.

``scope``: "sample": a row leaves when its own test fires. "batch" (Mirage's
``_sample``): one latent mode for the whole batch; every firing of a row's test is
counted, and the whole batch leaves at the test where the running count reaches the batch
size (a row can be counted twice), or at k_max.

``after``: what is fed once a row has left the segment: "end_token" (the end token:
Coconut, Monet, medlvr), "model" (nothing forced: the first answer token is drawn from the
last hidden state, as LVR feeds its own sampled token), "mirage" (scope "batch" with the
argmax end-token test only: at the exit test, Mirage's loop over the rows has written the
latent pad id into the rows before the one that completed the count, and left the others
their own token; a row whose token is the end token keeps it; a k_max exit forces the end
token on every row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

EXITS = ("fixed", "cosine", "stop_logit", "end_distance", "count")
EXIT_SCOPES = ("sample", "batch")
DISTANCES = ("mse", "l2")
DISTANCE_ON = ("fed", "next")
AFTER_EXIT = ("end_token", "model", "mirage")
DEFAULT_COSINE_THRESHOLD = 0.99
# LVR's lvr_end_threshold (src/model/qwen_lvr_model.py, QwenWithLVR.generate).
DEFAULT_END_DISTANCE = 0.02


@dataclass(frozen=True)
class ExitRule:
    """A checked exit rule. ``mode`` is the stop test the step runs: "fixed", "cosine",
    "head", "logit", "argmax", "end_distance" or "count"; ``threshold`` the value it
    compares against (the rule's default filled in)."""

    exit: str
    mode: str
    threshold: float
    scope: str = "sample"
    distance: str = "mse"
    distance_on: str = "fed"
    check_start: bool = False
    after: str = "end_token"
    end_embedding: torch.Tensor | None = None
    counts: tuple[int, ...] | None = None
    latent_pad_id: int | None = None

    @property
    def graph_key(self) -> tuple:
        """What changes the step's code (a captured graph serves every rule with the same
        key; thresholds, counts and the end embedding live in device buffers)."""
        return (self.mode, self.scope, self.distance, self.distance_on, self.check_start, self.after)


def _one_of(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _token(name: str, value, vocab: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (vocab is not None and value >= vocab):
        raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")
    return value


def counts_checked(latent_counts, *, k_max: int, batch: int | None) -> tuple[int, ...]:
    """The count rule's per-row step counts (host ints, each in [0, k_max])."""
    if latent_counts is None:
        raise ValueError("exit='count' needs latent_counts: one step count per sample")
    counts = latent_counts.tolist() if isinstance(latent_counts, torch.Tensor) else list(latent_counts)
    if (batch is not None and len(counts) != batch) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise ValueError(f"latent_counts must hold {batch} ints (one per sample), got {latent_counts!r}")
    if any(not 0 <= c <= k_max for c in counts):
        raise ValueError(f"latent_counts entries must lie in [0, k_max={k_max}], got {counts}")
    return tuple(counts)


def end_embedding_checked(end_embedding, *, hidden_size: int | None) -> torch.Tensor:
    if not isinstance(end_embedding, torch.Tensor) or end_embedding.dim() != 1 \
            or not end_embedding.is_floating_point():
        raise ValueError("exit='end_distance' needs end_embedding, a floating (D,) tensor (the learned end "
                         f"embedding), got {type(end_embedding).__name__}"
                         f"{tuple(end_embedding.shape) if isinstance(end_embedding, torch.Tensor) else ''}")
    if hidden_size is not None and end_embedding.shape[0] != hidden_size:
        raise ValueError(f"end_embedding must have shape ({hidden_size},) (the fed latent's size), "
                         f"got {tuple(end_embedding.shape)}")
    return end_embedding.detach()


def check_options(*, exit: str = "fixed", exit_threshold=None, exit_scope: str = "sample",
                  exit_distance: str = "mse", exit_distance_on: str = "fed", exit_check_start: bool = False,
                  after_exit: str = "end_token", latent_pad_id=None, has_stop_head: bool = False) -> None:
    """The checks that need no tensors and no batch: names, combinations, the threshold's
    range (also run by medlvr/dropin/spec.py when a spec is built)."""
    _one_of("exit", exit, EXITS)
    _one_of("exit_scope", exit_scope, EXIT_SCOPES)
    _one_of("exit_distance", exit_distance, DISTANCES)
    _one_of("exit_distance_on", exit_distance_on, DISTANCE_ON)
    _one_of("after_exit", after_exit, AFTER_EXIT)
    if not isinstance(exit_check_start, bool):
        raise ValueError(f"exit_check_start must be a bool, got {exit_check_start!r}")
    t = exit_threshold
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
        raise ValueError(f"exit_threshold must be a float or None, got {t!r}")
    if exit == "end_distance" and t is not None and not t > 0:
        raise ValueError(f"exit_threshold for exit='end_distance' must be > 0 (a distance), got {t}")
    if exit == "cosine" and t is not None and not -1.0 <= t <= 1.0:
        raise ValueError(f"exit_threshold for exit='cosine' must lie in [-1, 1], got {t}")
    if exit_check_start and exit != "stop_logit":
        raise ValueError(f"exit_check_start=True needs exit='stop_logit' (the end token at <start>), got {exit!r}")
    if exit_scope == "batch" and exit in ("fixed", "count"):
        raise ValueError(f"exit_scope='batch' counts firings of a data-dependent rule, not exit={exit!r}")
    if after_exit == "mirage":
        if exit_scope != "batch" or exit != "stop_logit" or t is not None or has_stop_head:
            raise ValueError("after_exit='mirage' needs exit='stop_logit' (argmax, no threshold, no stop head) "
                             "and exit_scope='batch'")
        if latent_pad_id is None:
            raise ValueError("after_exit='mirage' needs latent_pad_id (the id Mirage writes into latent positions)")


def checked(k_max: int, *, exit: str = "fixed", exit_threshold=None, exit_scope: str = "sample",
            exit_distance: str = "mse", exit_distance_on: str = "fed", exit_check_start: bool = False,
            after_exit: str = "end_token", latent_end_id: int | None = None, latent_pad_id: int | None = None,
            end_embedding=None, latent_counts=None, batch: int | None = None, hidden_size: int | None = None,
            vocab: int | None = None, has_stop_head: bool = False) -> ExitRule:
    """Check a rule's arguments (ValueError naming the argument) and fill its defaults."""
    check_options(exit=exit, exit_threshold=exit_threshold, exit_scope=exit_scope, exit_distance=exit_distance,
                  exit_distance_on=exit_distance_on, exit_check_start=exit_check_start, after_exit=after_exit,
                  latent_pad_id=latent_pad_id, has_stop_head=has_stop_head)
    t = exit_threshold
    if latent_end_id is not None:
        _token("latent_end_id", latent_end_id, vocab)
    if latent_pad_id is not None:
        _token("latent_pad_id", latent_pad_id, vocab)
    emb = counts = None
    mode = exit
    if exit == "end_distance":
        emb = end_embedding_checked(end_embedding, hidden_size=hidden_size)
    elif exit == "count":
        counts = counts_checked(latent_counts, k_max=k_max, batch=batch)
    elif exit == "stop_logit":
        if has_stop_head:
            mode = "head"
        elif latent_end_id is None:
            raise ValueError("exit='stop_logit' needs latent_end_id (or a latent_stop_head on the model)")
        else:
            mode = "argmax" if t is None else "logit"
    default = {"cosine": DEFAULT_COSINE_THRESHOLD, "end_distance": DEFAULT_END_DISTANCE}.get(exit, 0.0)
    return ExitRule(exit=exit, mode=mode, threshold=float(t) if t is not None else default, scope=exit_scope,
                    distance=exit_distance, distance_on=exit_distance_on, check_start=exit_check_start,
                    after=after_exit, end_embedding=emb, counts=counts, latent_pad_id=latent_pad_id)


def end_token_argmax(h: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """The greedy next token of each row, argmax lm_head(h) (B,)."""
    return lm_head(h).float().argmax(dim=-1)


def end_token_logit(h: torch.Tensor, lm_head: torch.nn.Module, end_id: torch.Tensor) -> torch.Tensor:
    """lm_head(h)[end] (B,) fp32 from one vocabulary row, not the whole head."""
    logit = F.linear(h, lm_head.weight.index_select(0, end_id)).float().squeeze(-1)
    if getattr(lm_head, "bias", None) is not None:
        logit = logit + lm_head.bias.index_select(0, end_id).float()
    return logit


def distance(v: torch.Tensor, end_embedding: torch.Tensor, metric: str) -> torch.Tensor:
    """(B,) fp32 distance of each row of v to the end embedding."""
    diff = v.float() - end_embedding.float()
    return diff.pow(2).mean(dim=-1) if metric == "mse" else diff.norm(dim=-1)


def stop_mask(rule: ExitRule, *, threshold, fed: torch.Tensor | None, mu: torch.Tensor | None,
              mu_next: torch.Tensor | None, h: torch.Tensor, lm_head: torch.nn.Module, end_id: torch.Tensor | None,
              stop_head: torch.nn.Module | None = None, num_latent: torch.Tensor | None = None,
              counts: torch.Tensor | None = None, end_embedding: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(stop (B,) bool or None for "fixed", the argmax tokens (B,) for "argmax" else None).

    fed: z_t, the latent fed at this step; mu / mu_next: mu_t and feedback(h_t); h: the
    post-norm output h_t the token tests read; num_latent: steps run so far, this one
    included (count); threshold, end_id (1,), counts, end_embedding: tensors (the engine's
    device buffers). Pure tensor math, no host sync."""
    mode = rule.mode
    if mode == "fixed":
        return None, None
    if mode == "cosine":
        return F.cosine_similarity(mu_next.float(), mu.float(), dim=-1) > threshold, None
    if mode == "head":
        return stop_head(h).float().reshape(-1) > threshold, None
    if mode == "end_distance":
        v = fed if rule.distance_on == "fed" else mu_next
        return distance(v, end_embedding, rule.distance) < threshold, None
    if mode == "count":
        return num_latent >= counts, None
    if mode == "logit":
        return end_token_logit(h, lm_head, end_id) > threshold, None
    tok = end_token_argmax(h, lm_head)
    return tok == end_id, tok


def batch_exit(stop: torch.Tensor, active: torch.Tensor, fired_count: torch.Tensor,
               batch_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirage's batch-global exit for one test: rows still in latent mode whose test fired
    are added, in row order, to the running count ``fired_count`` (a 0-d long tensor,
    updated in place). Returns (exits: 0-d bool, the batch leaves now; first: 0-d long, the
    row at which the count reached ``batch_size``)."""
    hits = (stop & active).long()
    running = fired_count + hits.cumsum(0)
    exits = (running[-1] >= batch_size) & active.any()
    first = (running < batch_size).long().sum()
    fired_count.copy_(running[-1])
    return exits, first


def mirage_after_tokens(tok: torch.Tensor, is_end: torch.Tensor, first: torch.Tensor, end_id: torch.Tensor,
                        pad_id: torch.Tensor) -> torch.Tensor:
    """The tokens Mirage's loop leaves in each row at the exit test (fed next): the end
    token where the row's own token is the end token, the latent pad id in rows before
    ``first`` (still in latent mode when the loop reached them), the row's own token after."""
    rows = torch.arange(tok.shape[0], device=tok.device)
    return torch.where(is_end, end_id, torch.where(rows < first, pad_id, tok))
