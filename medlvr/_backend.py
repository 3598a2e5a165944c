"""Which implementation runs an op: the compiled extension, Triton, or the reference.

Dispatch is decided per call from the tensor's device, what was built, and an override:
the environment variable ``MEDLVR_BACKEND`` or the ``force_backend`` context manager
(tests use it to run the Triton kernels on CPU under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("ext", "triton", "reference")

_local = threading.local()


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled ``medlvr._C`` module, or None when the package was built without it."""
    try:
        import medlvr._C as _C  # noqa: F401  (importing registers torch.ops.medlvr.*)
    except ImportError:
        return None
    return _C


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and ext.built_with_cuda())


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _override() -> str | None:
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced
    env = os.environ.get("MEDLVR_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"MEDLVR_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    return None


def forced() -> str | None:
    """The backend forced by ``force_backend`` or ``MEDLVR_BACKEND``; None when each op
    chooses for itself."""
    return _override()


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run every medlvr op inside the block on backend ``name`` (one of BACKENDS).

    Forcing a backend that cannot run on the given tensors raises at the op's call,
    it never falls back silently: ``triton`` on CPU tensors needs TRITON_INTERPRET=1,
    ``ext`` on CUDA tensors needs the CUDA build of the extension.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def choose(device: torch.device, *, has_ext: bool, has_triton: bool) -> str:
    """Pick the backend for an op on ``device``.

    has_ext / has_triton: whether this op family has that kind of fast path at all.
    Default order on CUDA: ext, then triton, then reference; on CPU: ext, then reference
    (Triton on CPU only when forced, as it then runs in the slow interpreter).
    """
    forced = _override()
    if forced is not None:
        if forced == "ext":
            if not has_ext:
                raise RuntimeError("backend 'ext' forced, but this op has no compiled kernel")
            if extension() is None:
                raise RuntimeError("backend 'ext' forced, but medlvr._C was not built")
            if device.type == "cuda" and not extension_has_cuda():
                raise RuntimeError("backend 'ext' forced on CUDA tensors, but medlvr._C was built without CUDA")
        elif forced == "triton":
            if not has_triton:
                raise RuntimeError("backend 'triton' forced, but this op has no Triton kernel")
            if not triton_importable():
                raise RuntimeError("backend 'triton' forced, but triton is not installed")
            if device.type != "cuda" and not triton_interpret():
                # Triton runs CPU tensors only in its interpreter, chosen once when triton is
                # imported; a process that runs Triton natively on CUDA tensors cannot.
                raise RuntimeError(
                    f"backend 'triton' forced on {device.type.upper()} tensors: Triton runs those only in its "
                    "interpreter; set TRITON_INTERPRET=1 before triton is imported, or put the tensors on a "
                    "CUDA device")
        return forced
    if device.type == "cuda":
        if has_ext and extension_has_cuda():
            return "ext"
        if has_triton and triton_importable():
            return "triton"
        return "reference"
    if has_ext and extension() is not None:
        return "ext"
    return "reference"


def describe() -> dict:
    """What was built and what will run, for ``medlvr info`` and bug reports."""
    ext = extension()
    info = {
        "extension": ext is not None,
        "extension_cpu": ext is not None,
        "extension_cuda": extension_has_cuda(),
        "triton": triton_importable(),
        "triton_interpret": triton_interpret(),
        "cuda_available": torch.cuda.is_available(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if ext is not None:
        info["extension_cuda_archs"] = ext.cuda_archs()
    return info
