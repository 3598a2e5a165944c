"""Run a decode-step function eagerly, or as a CUDA graph captured on its first use.

One graph per key (the engine keys by batch bucket, segment length and step kind); all
graphs share one memory pool. The first warm-up run before a capture, and every run while
``capture_checks()`` is on (tests, on CPU too), goes through ``CaptureGuard``
(medlvr/capture.py): a host sync or host<->device copy fails there with the line
that made it, instead of as a capture error or a value frozen into the graph. They never run concurrently and hand results over only
through the engine's preallocated buffers, which is what makes sharing the pool safe.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from medlvr.capture import CaptureGuard, checks_enabled

__all__ = ["GraphRunner", "capture_graph"]


def capture_graph(fn: Callable[[], Any], *, warmup: Callable[[], Any] | None = None, pool=None,
                  device: torch.device | None = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, out): ``fn`` recorded into one CUDA graph; ``out`` is what fn returned while it
    was recorded, the static tensors every ``graph.replay()`` rewrites.

    ``warmup`` (default: fn once) first runs for real on a side stream, as torch.cuda.graph
    requires: lazy allocations, cuBLAS handles, Triton compilation and autotuning happen
    there, outside the capture. The one place medlvr (and its benchmarks and tests) capture."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        (warmup or fn)()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()  # recorded, not executed
    return graph, out


class GraphRunner:
    """enabled: capture graphs (CUDA only); otherwise ``run`` just calls the function.
    state: returns the tensors a step mutates (the engine's step state), saved and
    restored around the warm-up runs that precede a capture."""

    def __init__(self, *, enabled: bool, device: torch.device, state: Callable[[], Sequence[torch.Tensor]]):
        self.enabled = enabled
        self.device = device
        self._state = state
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: tuple, fn: Callable[[], None]) -> None:
        if not self.enabled:
            if checks_enabled():
                with CaptureGuard(f"the graph {key}"):
                    fn()
            else:
                fn()
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, fn)
            self._graphs[key] = graph
        graph.replay()

    def reset(self) -> None:
        self._graphs.clear()
        self._pool = None

    def _capture(self, key: tuple, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Warm-up runs (cuBLAS handles, Triton compilation and autotuning) really execute
        # and advance the step state: it is saved and restored around them. Starting from
        # the same state they take the same exits, so their K/V writes land exactly where
        # the real replay then writes.
        tensors = list(self._state())
        saved = [t.clone() for t in tensors]

        def restore():
            for t, value in zip(tensors, saved):
                t.copy_(value)

        def warmup():
            for i in range(2):
                if i == 0:
                    with CaptureGuard(f"the graph {key}"):
                        fn()
                else:
                    fn()
                restore()

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, _ = capture_graph(fn, warmup=warmup, pool=self._pool, device=self.device)
        return graph
