"""One host read of the prompt lengths per ``generate``: the longest unpadded prompt is read
from the device once (each read is a host sync) and handed to the checks, the capacity test
and the prefill."""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine_models as tm
import medlvr.engine
from medlvr.engine import LatentEngine

_ENGINE_DIR = os.path.dirname(medlvr.engine.__file__) + os.sep
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _engine_frame() -> str | None:
    """file:line of the innermost frame outside torch, when it is engine code (not the HF
    model the prefill runs, which reads its own values)."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if f.filename.startswith(_TORCH_DIR) or f.filename == __file__:
            continue
        return f"{f.filename}:{f.lineno}" if f.filename.startswith(_ENGINE_DIR) else None
    return None

_aten = torch.ops.aten
_MAX_OPS = {_aten.max.default, _aten.amax.default, _aten.max.dim}


class MaxReads(TorchDispatchMode):
    """Host reads (.item(), int(), bool()) by engine code of a tensor that a max reduction made."""

    def __init__(self):
        super().__init__()
        self.maxima: list[torch.Tensor] = []
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MAX_OPS:
            self.maxima.append(out[0] if isinstance(out, tuple) else out)
        elif func is _aten._local_scalar_dense.default and any(args[0] is m for m in self.maxima):
            where = _engine_frame()
            if where is not None:
                self.reads.append(where)
        return out


@pytest.mark.parametrize("group_size", [None, 2])
def test_generate_reads_the_prompt_maximum_once(group_size):
    model = tm.qwen2_5_vl()
    batch = tm.left_pad([tm.vl_sample((2, 4), 3, seed=1), tm.vl_sample((2, 2), 5, seed=2)])
    assert int((batch["attention_mask"] == 0).sum()) > 0  # ragged: the lengths differ
    eng = LatentEngine(model, max_batch=4, max_len=64, max_prompts=2 if group_size else 0)
    with MaxReads() as m:
        eng.generate(batch, k_max=2, max_new_tokens=2, latent_end_id=tm.LATENT_END, group_size=group_size)
    assert len(m.reads) == 1, m.reads
