"""One :class:`LatentEngine` per model, built on first use and rebuilt larger when a call needs more.

An engine's static KV cache is allocated for a fixed capacity (rows x positions), and
building one allocates that cache (and, on CUDA, captures fresh graphs). Every caller that
generates more than once from the same model (VLPO rollouts, evaluation batches, the
drop-in ``generate``) therefore keeps one engine and asks it for a capacity:

    holder = EngineHolder(model, projector=proj)
    out = holder.generate(batch, k_max=K, max_new_tokens=T, ...)   # sized from the batch
    engine = holder.get(rows=B, max_len=prompt + K + T)             # or sized by hand

Capacity only grows: a request within the current capacity gets the same engine; a larger
one rebuilds it once at the element-wise maximum of the old and new needs, lengths rounded
up to ``len_multiple`` (fewer rebuilds when prompt lengths vary a little between calls) and
capped at the model's learned positions (GPT-2's ``n_positions``).

The engine holds the model's modules by reference (medlvr/engine/engine.py), so weights an
optimizer step updates in place, LoRA adapters included, are what the next call runs.

:meth:`EngineHolder.generate` / :meth:`EngineHolder.for_batch` size the engine from the
batch's shape, which the host knows: every prompt fits its padded width, and the engine
refuses a batch wider than its capacity anyway. The prompt lengths themselves are read from
the device once per call, by the engine's ``generate`` (each read is a host sync).

:func:`holder_for` keeps one holder per model object for callers with no place of their own
to keep it (the drop-in ``medlvr.generate``). Those holders reach the model only through a
weak reference, so the cache does not keep a model alive: once the caller drops the model,
the model, its holder and the engine's static cache are freed together. :func:`release`
drops a holder earlier.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from medlvr.engine.adapters import adapter_for
from medlvr.engine.engine import LatentEngine
from medlvr.engine.request import GenerateOutput, as_mapping, non_negative_int, positive_int
from medlvr.models import hf

__all__ = ["EngineHolder", "holder_for", "release"]


class EngineHolder:
    """The engine of one model (PEFT / DDP / FSDP wrappers are unwrapped to the HF model).

    projector, use_cuda_graphs, project_first, projector_logits: passed to every
    :class:`LatentEngine` built (see its docstring). len_multiple: lengths are rounded up to
    a multiple of it. A model type without an engine adapter is refused here, with the
    supported types in the message (``medlvr.engine.supports`` tests it beforehand).
    weak: reach the model through a weak reference only (what :func:`holder_for` keeps), so
    the holder does not keep the model alive; once the model is freed the holder raises
    ReferenceError. A projector that itself refers to the model (a bound method of it)
    would still keep it alive: pass a module, as the drop-in specs do.
    """

    def __init__(self, model: nn.Module, *, projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 use_cuda_graphs: bool | str = "auto", len_multiple: int = 64, project_first: bool = True,
                 projector_logits: bool = False, weak: bool = False):
        if isinstance(len_multiple, bool) or not isinstance(len_multiple, int) or len_multiple < 1:
            raise ValueError(f"len_multiple must be an int >= 1, got {len_multiple!r}")
        model = hf.unwrap(model)
        self.max_positions = adapter_for(model).max_positions  # raises for an unsupported model type
        self._ref = weakref.ref(model)
        # What engines are built on: the model, or for a weak holder a proxy, so that the
        # engine (its adapter, its model.modules() walk) refers to the model only weakly.
        self._target = weakref.proxy(model) if weak else model
        self.projector = projector
        self.use_cuda_graphs = use_cuda_graphs
        self.len_multiple = len_multiple
        self.project_first, self.projector_logits = project_first, projector_logits
        self.engine: LatentEngine | None = None
        self.builds = 0

    @property
    def model(self) -> nn.Module:
        """The (unwrapped) model the engines run."""
        model = self._ref()
        if model is None:
            raise ReferenceError("the model of this engine holder has been freed")
        return model

    def settings(self) -> tuple:
        """What the built engines depend on besides capacity (the projector by identity)."""
        return _settings(self.projector, self.use_cuda_graphs, self.project_first, self.projector_logits)

    def _round(self, n: int) -> int:
        up = -(-n // self.len_multiple) * self.len_multiple
        return max(min(up, self.max_positions), n) if self.max_positions is not None else up

    def get(self, *, rows: int, max_len: int, prompts: int = 0, prompt_len: int = 0) -> LatentEngine:
        """An engine with room for ``rows`` rows of ``max_len`` cached positions each and,
        for grouped generation (``generate(group_size=G)``), a shared prompt cache of
        ``prompts`` prompts of ``prompt_len`` positions: the held one when it fits, else
        one rebuilt at the larger capacity (never smaller than before)."""
        e = self.engine
        if (e is not None and rows <= e.max_batch and max_len <= e.max_len and prompts <= e.max_prompts
                and (prompts == 0 or prompt_len <= e.max_prompt_len)):
            return e
        max_batch = max(rows, e.max_batch if e is not None else 0)
        max_len = max(self._round(max_len), e.max_len if e is not None else 0)
        max_prompts = max(prompts, e.max_prompts if e is not None else 0)
        max_prompt_len = max(self._round(max(prompt_len, 1)),
                             e.max_prompt_len if e is not None and e.max_prompts else 0)
        self.engine = None  # free the old static cache before allocating the new one
        self.engine = LatentEngine(self._target, max_batch=max_batch, max_len=max_len, projector=self.projector,
                                   use_cuda_graphs=self.use_cuda_graphs, max_prompts=max_prompts,
                                   max_prompt_len=max_prompt_len if max_prompts else None,
                                   project_first=self.project_first, projector_logits=self.projector_logits)
        self.builds += 1
        return self.engine

    def for_batch(self, batch, *, k_max: int, max_new_tokens: int, group_size: int | None = None,
                  rows: int | None = None) -> LatentEngine:
        """The engine sized for ``generate(batch, k_max=..., max_new_tokens=..., group_size=...)``,
        from the batch's shape alone (no device read): the prompt in its padded width, then
        k_max latents and max_new_tokens answer positions, in each row's own cache, or with
        group_size=G in a shared prompt cache of one entry per prompt and G rows per prompt.
        rows: room for at least this many rows (a caller that knows its largest batch up
        front builds once); default: the batch's."""
        ids = as_mapping(batch).get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            got = getattr(ids, "shape", type(ids).__name__)
            raise ValueError(f"batch['input_ids'] must be a (batch, length) tensor, got {got}")
        B, width = ids.shape
        rows = B if rows is None else max(B, positive_int("rows", rows))
        need = non_negative_int("k_max", k_max) + non_negative_int("max_new_tokens", max_new_tokens)
        if group_size is None:
            return self.get(rows=rows, max_len=width + need)
        G = positive_int("group_size", group_size)
        return self.get(rows=max(B * G, rows), max_len=need, prompts=B, prompt_len=width)

    def generate(self, batch, *, k_max: int, max_new_tokens: int, group_size: int | None = None,
                 rows: int | None = None, **kwargs) -> GenerateOutput:
        """``LatentEngine.generate`` on the engine :meth:`for_batch` gives (built or grown
        when the batch needs it); kwargs: the rest of ``LatentEngine.generate``'s arguments.
        The call reads the prompt lengths from the device once, inside the engine."""
        engine = self.for_batch(batch, k_max=k_max, max_new_tokens=max_new_tokens, group_size=group_size,
                                rows=rows)
        return engine.generate(batch, k_max=k_max, max_new_tokens=max_new_tokens, group_size=group_size, **kwargs)


def _settings(projector, use_cuda_graphs, project_first, projector_logits) -> tuple:
    return (id(projector), use_cuda_graphs, project_first, projector_logits)


# model -> its holder. The holders here are weak (they and their engines reach the model
# through a weak reference), so nothing in an entry keeps its key alive: the entry goes
# when the model does.
_HOLDERS: "weakref.WeakKeyDictionary[nn.Module, EngineHolder]" = weakref.WeakKeyDictionary()


def holder_for(model: nn.Module, *, projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
               use_cuda_graphs: bool | str = "auto", project_first: bool = True,
               projector_logits: bool = False) -> EngineHolder:
    """The holder kept for ``model`` (unwrapped); a new one when the settings differ from the
    kept one's (another projector or projector flags need another engine)."""
    key = hf.unwrap(model)
    held = _HOLDERS.get(key)
    if held is None or held.settings() != _settings(projector, use_cuda_graphs, project_first, projector_logits):
        held = EngineHolder(key, projector=projector, use_cuda_graphs=use_cuda_graphs, project_first=project_first,
                            projector_logits=projector_logits, weak=True)
        _HOLDERS[key] = held
    return held


def release(model: nn.Module) -> None:
    """Drop the holder kept for ``model`` (and with it the engine's static cache)."""
    _HOLDERS.pop(hf.unwrap(model), None)
