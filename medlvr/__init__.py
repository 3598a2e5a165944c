"""medlvr: fast latent visual reasoning for vision-language models (kernels + training)."""
from medlvr._backend import force_backend

__version__ = "0.1.0"

__all__ = ["force_backend", "__version__"]
