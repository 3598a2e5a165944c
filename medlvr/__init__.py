"""medlvr: fast latent visual reasoning for vision-language models (kernels + training)."""
from medlvr._backend import force_backend

__version__ = "0.1.0"

__all__ = ["force_backend", "__version__", "generate", "patch", "LatentSpec"]


def __getattr__(name):
    # The drop-in API imports transformers-facing code: loaded on first use, not on `import medlvr`.
    if name in ("generate", "patch", "LatentSpec", "custom_generate"):
        from medlvr import dropin

        return getattr(dropin, name)
    raise AttributeError(f"module 'medlvr' has no attribute {name!r}")
