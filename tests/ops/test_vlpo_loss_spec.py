"""medlvr.ops.vlpo_loss.group_advantages against its group-by-group spec
(medlvr/reference/vlpo_loss.py): fp32 within 1e-5 relative (the op computes in fp32, the spec
in fp64), fp64 within 1e-12; flat groups and n = 1 exactly 0."""
from __future__ import annotations

import pytest
import torch

from medlvr.ops.vlpo_loss import group_advantages
from medlvr.reference import vlpo_loss as spec

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _rewards(kind: str, groups: int, n: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":  # the usual verifiable reward: 0 / 1 per rollout
        r = (torch.rand(groups * n, generator=g) < 0.5).double()
    elif kind == "continuous":
        r = torch.rand(groups * n, generator=g, dtype=torch.float64) * 3.0 - 1.0
    else:  # "flat": every group one value
        r = torch.rand(groups, generator=g, dtype=torch.float64).repeat_interleave(n)
    return r.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["binary", "continuous", "flat"])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_group_advantages_equals_spec(dtype, kind, n):
    for seed in range(4):
        r = _rewards(kind, 6, n, dtype, seed)
        got = group_advantages(r, n)
        want = spec.group_advantages(r, n)
        assert got.dtype == want.dtype == dtype
        tol = TOL[dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        flat = (r.view(-1, n).amax(1) == r.view(-1, n).amin(1)).repeat_interleave(n)
        assert torch.all(got[flat] == 0) and torch.all(want[flat] == 0)
        if n == 1 or kind == "flat":
            assert bool(flat.all())


def test_group_advantages_mixed_groups_and_eps():
    # one flat group next to a spread one; a custom eps; fp16 rewards come back fp32
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5], dtype=torch.float16)
    got = group_advantages(r, 3, eps=0.1)
    want = spec.group_advantages(r, 3, eps=0.1)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
