"""Which model family's facts a model or processor follows: a registry keyed by model_type.

A family is a module of medlvr/models that states what training and evaluation need to know
about one kind of model (medlvr/models/qwen_vl.py: the chat layout, the image placeholder, the
answer end and pad fallback, the vision tower's patch and merge, the LoRA targets). It names
the HF ``config.model_type`` values it serves in ``MODEL_TYPES`` and the processor classes in
``PROCESSORS``. Nothing outside this module picks a family by name: collate, the stage-1 ROI
term, the builder and the VLPO / eval token ids ask :func:`of_model` or :func:`of_processor`.

Adding a family is its module in medlvr/models (found here by those two names, so no list to
edit) and its engine adapter (medlvr/engine/adapters/), which the engine finds the same way
(liger-kernel keys its patches by model_type too: ``MODEL_TYPE_TO_APPLY_LIGER_FN`` in
src/liger_kernel/transformers/monkey_patch.py).
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType
from typing import Any

import medlvr.models as _models_pkg
from medlvr.models.hf import unwrap

__all__ = ["families", "of_model", "of_processor", "of_model_type"]


@functools.lru_cache(maxsize=None)
def families() -> dict[str, ModuleType]:
    """model_type -> family module, from every module of medlvr/models that declares
    ``MODEL_TYPES`` (imported once)."""
    out: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(_models_pkg.__path__):
        mod = importlib.import_module(f"{_models_pkg.__name__}.{info.name}")
        for t in getattr(mod, "MODEL_TYPES", ()):
            if t in out and out[t] is not mod:
                raise RuntimeError(f"model_type {t!r} is claimed by {out[t].__name__} and {mod.__name__}")
            out[t] = mod
    return out


def of_model_type(model_type: str) -> ModuleType:
    fam = families().get(model_type)
    if fam is None:
        raise ValueError(f"model: no medlvr model family for model_type {model_type!r}; supported: "
                         f"{sorted(families())} (a family is a module in medlvr/models with MODEL_TYPES)")
    return fam


def of_model(model: Any) -> ModuleType:
    """The family of an HF model (peft / DDP / FSDP wrapped or not) or of its config."""
    cfg = model if hasattr(model, "model_type") and not hasattr(model, "config") else unwrap(model).config
    return of_model_type(cfg.model_type)


def of_processor(processor: Any) -> ModuleType:
    """The family whose ``PROCESSORS`` names the processor's class (or one of its bases)."""
    names = {c.__name__ for c in type(processor).__mro__}
    for fam in dict.fromkeys(families().values()):
        if names & set(getattr(fam, "PROCESSORS", ())):
            return fam
    known = sorted({p for f in families().values() for p in getattr(f, "PROCESSORS", ())})
    raise ValueError(f"processor: no medlvr model family for a {type(processor).__name__}; supported: {known}")
