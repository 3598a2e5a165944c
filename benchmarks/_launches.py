"""Where the time of a small op goes besides its kernels: host time, launches, host reads.

Two ways to count, one per machine:
- ``cpu_accounting(fn)``, no GPU: Triton launches are counted and *skipped* (the
  interpreter would execute them as numpy, which says nothing about a GPU), torch ops are
  counted at the dispatcher (each op that is not a view or an allocation is at least one
  kernel launch on a GPU), and torch calls that read tensor data on the host or make a
  tensor from host data are counted (on a GPU each is a device sync, resp. a
  host-to-device copy). The wall time of ``fn`` is then its host time on this CPU.
- ``cuda_accounting(fn)``: torch.profiler's CUDA activity: kernels launched, their
  summed device time, memcpy/memset operations and the CUDA runtime's synchronisations.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from typing import Callable
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no device kernel: views, metadata, allocation
_KERNEL_FREE = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "as_strided", "detach", "alias", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "select",
    "slice", "split", "split_with_sizes", "unbind", "lift_fresh", "_reshape_alias", "resize_", "set_",
    "view_as", "expand_as", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_local_scalar_dense",
    "is_nonzero", "unsafe_split", "unsafe_split_with_sizes",
}
# torch calls that read device data on the host, or make a tensor from host data
_HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu"}
_HOST_MADE = {"tensor", "as_tensor", "from_numpy"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _KERNEL_FREE:
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


class _Host(TorchFunctionMode):
    """Host reads through the torch-function mode; tensors made from host data by wrapping
    the factories, which the mode cannot see (torch.overrides ignores them)."""

    def __init__(self):
        super().__init__()
        self.reads = Counter()
        self.made = Counter()
        self._patches = contextlib.ExitStack()

    def __enter__(self):
        for name in _HOST_MADE:
            self._patches.enter_context(mock.patch.object(torch, name, self._counting(name, getattr(torch, name))))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    def _counting(self, name, factory):
        def make(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                self.made[name] += 1
            return factory(data, *args, **kwargs)
        return make

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _HOST_READS:
            self.reads[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _skipped_triton_launches():
    """Count Triton launches by kernel name and skip them (interpreter mode only)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = Counter()

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches[self.fn.__name__] += 1

    with mock.patch.object(InterpretedFunction, "run", run):
        yield launches


def cpu_accounting(fn: Callable[[], object], *, iters: int = 20, warmup: int = 3) -> dict:
    """Host ms (median and min wall time of ``fn`` with Triton launches skipped: on a shared
    machine the min is the steadier estimate), launches and host traffic.

    Needs TRITON_INTERPRET=1 for ops that launch Triton kernels (else they never reach
    the interpreter's launcher and cannot be skipped).
    """
    with _skipped_triton_launches() as launches:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        launches.clear()
        with _Host() as host, _Ops() as ops:
            fn()
    return {"host ms": statistics.median(samples), "host ms (min)": min(samples), "triton launches": sum(launches.values()),
            "torch kernels": sum(ops.kernels.values()), "host reads": sum(host.reads.values()),
            "host-made tensors": sum(host.made.values()),
            "detail": "; ".join(f"{k} x{v}" for k, v in (launches + ops.kernels + host.reads + host.made).items())}


def cuda_accounting(fn: Callable[[], object], *, iters: int = 20, warmup: int = 3) -> dict:
    """Host ms (median time to issue ``fn``, synchronised before and after, not timed), per call:
    kernels, their device ms, memcpy/memset and synchronising runtime calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            with torch.profiler.record_function("accounted call"):
                fn()
        torch.cuda.synchronize()
    events = prof.events()
    calls = [e.time_range for e in events if e.name == "accounted call"]
    kernels = copies = syncs = 0
    kernel_us = 0.0
    names = Counter()
    for e in events:
        kind = str(getattr(e, "device_type", ""))
        if kind.endswith("CUDA"):
            low = e.name.lower()
            if "memcpy" in low or "memset" in low:
                copies += 1
            else:
                kernels += 1
                kernel_us += e.time_range.elapsed_us()
                names[e.name.split("(")[0][:40]] += 1
        elif e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize"):
            # only inside the calls (not the synchronize that closes the profiled region)
            syncs += any(c.start <= e.time_range.start <= c.end for c in calls)
    return {"host ms": statistics.median(samples), "host ms (min)": min(samples), "kernels": kernels / iters, "kernel ms": kernel_us / iters / 1e3,
            "memcpy/memset": copies / iters, "syncs": syncs / iters,
            "detail": "; ".join(f"{k} x{v / iters:g}" for k, v in names.items())}
