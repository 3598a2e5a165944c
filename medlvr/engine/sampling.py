"""The engine's token sampler: the device-side, capture-safe math lives in the bottom
layer (medlvr/reference/sampling.py) so that the plain-HF loop draws tokens the same way
without importing the engine."""
from medlvr.reference.sampling import sample, top_p_filter

__all__ = ["sample", "top_p_filter"]
