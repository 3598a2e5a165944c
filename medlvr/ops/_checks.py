"""Argument checks shared by the public ops: every message names the argument, what was
expected and what was received, and every check runs before any kernel launches.

The fp64 rule, the same for every op and every device: **fp64 is computed in fp64, end to
end.** The references (medlvr/reference/) and the compiled extension (csrc/: C++ on CPU,
CUDA on GPU, whose accumulators follow the input type) compute fp64 inputs in fp64. The
Triton kernels (medlvr/kernels/) compute in fp32, so they take no fp64 operand: an op that has
one picks the reference by itself for a call with an fp64 tensor, and forcing the Triton
backend on such a call raises a TypeError naming the argument. ``backend`` below is the
one place that applies the rule: an op dispatches through it, not through
medlvr._backend.choose directly. ``compute_dtype`` applies it (and the mixed-dtype rule) to
the lm_head GEMM of the fused log-prob ops.
"""
from __future__ import annotations

import math
import numbers

import torch

from medlvr import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: what the Triton kernels take: they compute in fp32 (fp64 rule above)
FP32_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def tensor(name: str, t, *, dims: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def same_devices(ref_name: str, ref: torch.Tensor, **named) -> None:
    """same_device for several tensors at once; None entries (optional arguments) are skipped."""
    for name, t in named.items():
        if t is not None:
            same_device(name, t, ref_name, ref)


def choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def finite_scalar(name: str, value, ok, expected: str) -> None:
    """A float argument that must be finite and satisfy ``ok``: else a ValueError "name:
    expected <expected>, got <value>". The finite test comes first because a range test alone
    lets inf through (eps_high = inf passes eps_high >= 0) and a NaN fail it without saying
    why."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name}: expected {expected}, got {value}")


def read_flags(*flags: torch.Tensor) -> list[bool]:
    """0-dim bool tensors of one device read back in one host transfer (one sync on CUDA,
    however many value checks an op makes)."""
    return [bool(f) for f in torch.stack(flags).tolist()] if flags else []


def nonfinite_error(name: str, t: torch.Tensor, where: torch.Tensor | None = None, what: str = "") -> ValueError:
    """The error for a tensor holding NaN or inf (at a position of ``where``, when given):
    names the argument, the first bad index and its value. Only built on the error path, so
    the extra reads cost nothing in a good call."""
    bad = ~torch.isfinite(t) if where is None else ~torch.isfinite(t) & where
    idx = [int(i) for i in bad.nonzero()[0]]
    return ValueError(f"{name}: expected finite values{what}, got {float(t[tuple(idx)])} at {name}{idx}")


def integer(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def targets_in_range(name: str, targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """Every entry of ``targets`` is in [0, V) or equals ``ignore_index``. Reads the data (one
    host sync), so it is skipped while torch.compile traces."""
    if targets.numel() == 0 or compiling():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{row}] = {int(targets[row])} is outside [0, V = {V}) and is not "
                         f"ignore_index = {ignore_index}")


def compiling() -> bool:
    """True while torch.compile traces: value checks that read tensor data are skipped then
    (they would graph-break), shape/dtype checks still run."""
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype an lm_head GEMM of the fused log-prob ops runs in (medlvr/ops/fused_logprobs.py;
    its softmax math is fp32 whatever this is). Spec: medlvr.reference.fused_logprobs.compute_dtype.

    fp64 pairs only with fp64 (the fp64 rule: never an fp32 GEMM inside an fp64 call). Under
    ``torch.autocast`` on the device, the autocast dtype, which is what ``F.linear`` would run
    in. Else one dtype runs as it is, and fp32 beside a 16-bit dtype runs in the 16-bit one
    (the model's own bf16 lm_head against fp32 master weights gives those logits; the fp32
    operand is cast once). fp16 beside bf16 has no lossless common dtype and is refused.
    """
    pair = {hidden_dtype, weight_dtype}
    if torch.float64 in pair:
        if len(pair) > 1:
            raise TypeError(f"weight must have the dtype of hidden when either is float64, got hidden "
                            f"{_dtype_name(hidden_dtype)} and weight {_dtype_name(weight_dtype)}")
        return torch.float64
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    half = [d for d in (hidden_dtype, weight_dtype) if d in _HALF_DTYPES]
    if len(set(half)) > 1:
        raise TypeError(f"weight and hidden must not mix float16 and bfloat16, got hidden "
                        f"{_dtype_name(hidden_dtype)} and weight {_dtype_name(weight_dtype)}")
    return half[0] if half else hidden_dtype


def backend(op: str, device: torch.device, *, has_ext: bool = False, has_triton: bool = False, **operands) -> str:
    """The backend for one call of ``op`` (see medlvr._backend.choose), under the fp64 rule.

    operands: the call's floating tensors by argument name (None entries are skipped).
    An fp64 one rules out the fp32 Triton kernels: without a forced backend the call goes
    to the extension or the reference, which compute it in fp64; with ``triton`` forced it
    is a TypeError naming the argument, never an fp32 result in an fp64 tensor.
    """
    fp64 = [name for name, t in operands.items() if t is not None and t.dtype == torch.float64]
    if fp64 and has_triton:
        if _backend.forced() == "triton":
            names = ", ".join(str(d).replace("torch.", "") for d in FP32_KERNEL_DTYPES)
            raise TypeError(f"{op}: {fp64[0]} has dtype float64, but the forced 'triton' backend computes in "
                            f"fp32 and takes ({names}); fp64 is computed in fp64 by the reference, which "
                            f"{op} picks by itself for fp64 inputs")
        has_triton = False
    return _backend.choose(device, has_ext=has_ext, has_triton=has_triton)
