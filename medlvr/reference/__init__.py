"""Plain-PyTorch references of every medlvr op: the executable specification.

The fast paths in ``medlvr.ops`` are tested against these functions, and they are the
CPU fallback wherever no compiled or Triton kernel applies.
"""
