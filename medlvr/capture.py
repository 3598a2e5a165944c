"""Capture safety: what may not happen inside a region the engine records as a CUDA graph.

A CUDA graph records kernel launches, not Python. Inside a captured region:
- a host sync (``.item()``, ``.tolist()``, ``int()``/``bool()`` of a tensor, a Python
  ``if`` on a tensor, ``nonzero``, boolean-mask indexing) either fails the capture or
  bakes one value into every replay;
- a host<->device copy (``.cpu()``, ``.to(other device)``, ``torch.tensor(list)``, a factory
  without ``device=`` that makes a host tensor) fails the capture ("Cannot copy between
  CPU and CUDA tensors during CUDA graph capture") or reads stale pageable memory;
- a tensor made from Python data is a host copy of a value frozen at capture time.

On a GPU these fail loudly, but only there. :class:`CaptureGuard` makes the same mistakes
fail on CPU: it watches every torch call (a ``TorchFunctionMode``: methods and factories,
where ``.tolist()`` and ``.cpu()`` are still visible even when the tensor already lives on
the host) and every aten op (a ``TorchDispatchMode``: syncs that library code does in C++,
tensors lifted from Python data) and raises :class:`CaptureViolation` naming the call and
the line that made it. ``GraphRunner`` (medlvr/engine/graphs.py) runs each function it
would capture under the guard when :func:`capture_checks` is on (the tests turn it on
around every engine call) and always for the warm-up runs before a real capture.
"""
from __future__ import annotations

import contextlib
import os
import threading
import traceback
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CaptureViolation", "CaptureGuard", "capture_checks", "checks_enabled", "in_guarded_region"]

_local = threading.local()

# Tensor methods that read device memory from the host (a sync, and a device->host copy).
_HOST_READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__"}
# Factories that make a new tensor on the default device (the host) unless given device=.
_FACTORIES = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "randperm", "linspace",
              "logspace", "eye", "empty_strided", "scalar_tensor", "tril_indices", "triu_indices"}
# Tensors from Python data: a host copy of a value frozen at capture.
_FROM_PYTHON = {"tensor", "as_tensor", "from_numpy", "asarray"}

_aten = torch.ops.aten
# aten ops that synchronise the host with the device (data-dependent sizes or a read).
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "reads a tensor value on the host (.item(), int(), a Python if)",
    _aten.nonzero.default: "nonzero (output size depends on the data: a host sync)",
    _aten.masked_select.default: "masked_select (output size depends on the data: a host sync)",
    _aten._unique2.default: "unique (output size depends on the data: a host sync)",
    _aten.unique_consecutive.default: "unique_consecutive (a host sync)",
    _aten.unique_dim.default: "unique (a host sync)",
    _aten.lift_fresh.default: "a tensor made from Python data (torch.tensor / as_tensor)",
    _aten.lift_fresh_copy.default: "a tensor made from Python data (torch.tensor / as_tensor)",
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}

_SKIP_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, contextlib, traceback)) + (__file__,)


class CaptureViolation(RuntimeError):
    """Something that cannot be recorded in (or would be frozen into) a CUDA graph."""


def checks_enabled() -> bool:
    return bool(getattr(_local, "depth", 0))


def in_guarded_region() -> bool:
    """True while a CaptureGuard is active: code that reads values on the host only on CPU
    (the ops' debug checks) must then behave as it does on a GPU inside a graph."""
    return bool(getattr(_local, "guarded", 0))


@contextlib.contextmanager
def capture_checks() -> Iterator[None]:
    """Within the block, every function the engine would capture as a CUDA graph runs under
    :class:`CaptureGuard`, on any device (CPU included), and raises on the first violation."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _caller() -> traceback.FrameSummary | None:
    """The innermost frame outside torch (the line that made the call), or None when that
    frame is inside triton: its interpreter moves CPU tensors through the host by design."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(_SKIP_DIRS):
            continue
        if f"{os.sep}triton{os.sep}" in frame.filename:
            return None
        return frame
    return None


def _is_bool_index(arg) -> bool:
    if isinstance(arg, torch.Tensor):
        return arg.dtype == torch.bool
    if isinstance(arg, (list, tuple)):
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in arg)
    return False


def _device_of(args, kwargs) -> torch.device | None:
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            try:
                return torch.device(a)
            except RuntimeError:
                continue
    return None


class _GuardMode:
    """A torch mode that reports to a CaptureGuard (mixed into the function and dispatch modes)."""

    def __init__(self, guard: "CaptureGuard"):
        super().__init__()
        self.guard = guard


class _FunctionGuard(_GuardMode, TorchFunctionMode):

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.guard.violation(f"Tensor.{name.strip('_')}()", "reads device memory on the host (a sync and a "
                                                                 "device->host copy)")
        elif name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            dev = torch.device("cuda") if name == "cuda" else _device_of(args, kwargs)
            if dev is not None and dev.type != args[0].device.type:
                self.guard.violation(f"Tensor.{name}({dev})", f"a copy from {args[0].device.type} to {dev.type}")
        elif name == "pin_memory":
            self.guard.violation("Tensor.pin_memory()", "a host buffer")
        elif getattr(torch, name, None) is func:
            if name in _FROM_PYTHON:
                self.guard.violation(f"torch.{name}(...)", "a tensor made from Python data (a host copy frozen "
                                                           "at capture): keep it in a preallocated buffer")
            elif name in _FACTORIES and kwargs.get("device") is None:
                self.guard.violation(f"torch.{name}(...) without device=", "makes a host tensor, which on CUDA "
                                                                           "means a host->device copy")
        return func(*args, **kwargs)


class _DispatchGuard(_GuardMode, TorchDispatchMode):

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.guard.violation(str(func), _SYNC_OPS[func])
        elif func in _INDEX_OPS and len(args) > 1 and _is_bool_index(args[1]):
            self.guard.violation(str(func), "boolean-mask indexing (nonzero inside: a host sync); use "
                                            "torch.where or masked_fill")
        elif func in (_aten.copy_.default, _aten._to_copy.default):
            src = args[1] if func is _aten.copy_.default else args[0]
            dst = args[0].device if func is _aten.copy_.default else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and torch.device(dst).type != src.device.type:
                self.guard.violation(str(func), f"a copy from {src.device.type} to {torch.device(dst).type}")
        return func(*args, **kwargs)


class CaptureGuard(contextlib.AbstractContextManager):
    """Raise :class:`CaptureViolation` on the first capture-unsafe call in the block.

    what: a name for the region, used in the message (e.g. the graph key)."""

    def __init__(self, what: str = "a captured region"):
        self.what = what
        self._modes = (_FunctionGuard(self), _DispatchGuard(self))
        self._active = False

    def violation(self, call: str, why: str) -> None:
        if not self._active:
            return
        where = _caller()
        if where is None:
            return
        # Off while raising: building the message must not trip the guard again.
        self._active = False
        raise CaptureViolation(f"{call} inside {self.what} ({why}), at {where.filename}:{where.lineno}: "
                               f"{(where.line or '').strip()}")

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        self._active = True
        _local.guarded = getattr(_local, "guarded", 0) + 1
        return self

    def __exit__(self, *exc):
        self._active = False
        _local.guarded -= 1
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False
