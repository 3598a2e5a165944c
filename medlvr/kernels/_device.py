"""The launch guard every launcher of medlvr.kernels runs its Triton launches under."""
import contextlib

import torch


def on_device(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, else nothing.

    Triton launches on the *current* CUDA device and its current stream, not on the one
    the arguments live on: a call with tensors on cuda:1 from a process whose current
    device is cuda:0 would run the kernel on cuda:0 with cuda:1 pointers. flash-attn wraps
    its Triton launches in the same guard (Dao-AILab/flash-attention,
    flash_attn/ops/triton/layer_norm.py, _layer_norm_fwd and _layer_norm_bwd). Making
    the device that is already current current again changes nothing, during CUDA-graph
    capture too."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
