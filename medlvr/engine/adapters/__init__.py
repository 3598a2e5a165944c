"""Model adapters, chosen by ``config.model_type`` (see base.py for how to add one). Every
module of this folder is imported here, so an adapter registers itself by existing."""
import importlib
import pkgutil

from medlvr.engine.adapters.base import (DecoderLayer, ModelAdapter, Prefill, adapter_for,
                                         supported_model_types, supports)

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["DecoderLayer", "ModelAdapter", "Prefill", "adapter_for", "supported_model_types", "supports"]
