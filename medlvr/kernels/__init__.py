"""Triton kernels of medlvr, installed as ``medlvr.kernels`` (one module per op family).

Every module here holds raw kernels and their plain launchers only; argument checks,
autograd and dispatch live in ``medlvr.ops``. On a machine without CUDA the kernels run
under ``TRITON_INTERPRET=1`` on CPU tensors (tests only: it is slow).
"""
