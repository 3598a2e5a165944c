"""``medlvr info``: versions, the backends built and the device that will be used."""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No arguments."""


def run(args: argparse.Namespace) -> int:
    import torch

    from medlvr import __version__
    from medlvr._backend import describe

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    b = describe()
    lines = [
        f"medlvr         {__version__}",
        f"python         {platform.python_version()} ({platform.machine()})",
        f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton         {version('triton')}",
        f"transformers   {version('transformers')}",
        f"accelerate     {version('accelerate')}",
        f"peft           {version('peft')}",
        "backends built:",
        f"  C++ (CPU)    {'yes' if b['extension_cpu'] else 'NO (medlvr._C missing: ops use the PyTorch reference)'}",
        f"  CUDA         {'yes, archs ' + b.get('extension_cuda_archs', '') if b['extension_cuda'] else 'no'}",
        f"  Triton       {'yes' if b['triton'] else 'no'}"
        + ("  (TRITON_INTERPRET=1: CPU interpreter)" if b["triton_interpret"] else ""),
        f"device         {b['device']}"
        + (f" ({torch.cuda.get_device_name()})" if b["cuda_available"] else f" ({torch.get_num_threads()} threads)"),
    ]
    print("\n".join(lines))
    return 0
