"""medlvr: fast latent visual reasoning for vision-language models (kernels + training)."""
from medlvr._backend import force_backend

__version__ = "0.1.0"

__all__ = ["force_backend", "__version__", "generate", "patch", "LatentSpec", "load_trained", "VLPOConfig",
           "train_vlpo"]

# name -> the module that defines it. These import transformers-facing code, so they load on
# first use, not on `import medlvr`.
_LAZY = {"generate": "medlvr.dropin", "patch": "medlvr.dropin", "LatentSpec": "medlvr.dropin",
         "custom_generate": "medlvr.dropin", "load_trained": "medlvr.policy", "VLPOConfig": "medlvr.train.vlpo",
         "train_vlpo": "medlvr.train.vlpo"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medlvr' has no attribute {name!r}")
