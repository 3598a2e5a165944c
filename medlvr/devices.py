"""Where a command runs and in which precision: the rules every training and evaluation
command shares (the loop, medlvr/train/loop.py; evaluation, medlvr/eval/evaluate.py)."""
from __future__ import annotations

import os

import torch

__all__ = ["DEVICES", "MIXED_PRECISION", "check_device", "trains_on_gpu", "gpu_per_rank", "resolve_mixed_precision"]

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def check_device(device: str) -> str:
    """``device`` of the training commands: auto (a GPU per rank when there are enough, see
    :func:`gpu_per_rank`, else the CPU), cpu, or cuda (an error when there is none)."""
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    return device


def trains_on_gpu(device: str = "auto") -> bool:
    return check_device(device) == "cuda" or (device == "auto" and gpu_per_rank())


def gpu_per_rank() -> bool:
    """Whether this process trains on a GPU: one GPU per rank when there are enough of them
    (NCCL), else every rank on the CPU (gloo). Two NCCL ranks on one GPU fail
    ("ncclInvalidUsage: Duplicate GPU detected"), so a 2-rank launch on a 1-GPU machine
    runs on the CPU instead of crashing."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.cuda.is_available() and torch.cuda.device_count() >= ranks_here


def resolve_mixed_precision(mode: str, device: str = "auto") -> str:
    """"auto" -> bf16 autocast on a GPU, plain fp32 on the CPU (CPU bf16 autocast is slow
    and only changes numerics there; ask for "bf16" to test the GPU's numerics on a CPU)."""
    if mode not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision: expected one of {MIXED_PRECISION}, got {mode!r}")
    if mode == "auto":
        return "bf16" if trains_on_gpu(device) else "no"
    return mode
