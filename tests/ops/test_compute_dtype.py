"""The lm_head GEMM's dtype rule of the fused log-prob ops (medlvr.ops._checks.compute_dtype)
equals its spec (medlvr.reference.fused_logprobs.compute_dtype) over every pair of float
dtypes, on both device types, with autocast off and on (bf16 and fp16): the same dtype, or
the same TypeError."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from medlvr.ops._checks import compute_dtype
from medlvr.reference.fused_logprobs import compute_dtype as compute_dtype_spec

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@contextlib.contextmanager
def _autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast state of ``device_type`` set directly, so that "cuda" can be tested on a
    machine without a GPU (torch.autocast("cuda") would switch itself off there)."""
    before = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if dtype is not None:
        torch.set_autocast_enabled(device_type, True)
        torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, before[0])
        torch.set_autocast_dtype(device_type, before[1])


def _outcome(fn, *args):
    try:
        return fn(*args)
    except TypeError as e:
        return ("TypeError", str(e))


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["off", "bf16", "fp16"])
def test_compute_dtype_equals_spec(device_type, autocast):
    outcomes = set()
    with _autocast(device_type, autocast):
        for hidden, weight in itertools.product(DTYPES, DTYPES):
            got = _outcome(compute_dtype, hidden, weight, device_type)
            want = _outcome(compute_dtype_spec, hidden, weight, device_type)
            assert got == want, (hidden, weight)
            outcomes.add(got if isinstance(got, torch.dtype) else got[0])
    # the grid reaches every branch: refusals and each result dtype the rule can give
    assert "TypeError" in outcomes and torch.float64 in outcomes
    if autocast is None:
        assert {torch.float16, torch.bfloat16, torch.float32} <= outcomes
    else:
        assert autocast in outcomes and torch.float32 not in outcomes


def test_autocast_on_another_device_type_does_not_count():
    with _autocast("cuda", torch.bfloat16):
        assert compute_dtype(torch.float32, torch.float32, "cpu") == torch.float32
        assert compute_dtype_spec(torch.float32, torch.float32, "cpu") == torch.float32
