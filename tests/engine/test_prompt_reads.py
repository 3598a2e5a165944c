"""One host read of the prompt lengths per ``generate``: the longest unpadded prompt is read
from the device once (each read is a host sync) and handed to the checks, the capacity test
and the prefill. The same holds through the engine holder (medlvr/engine/holder.py), which
sizes the engine from the batch's shape, and through its callers: the drop-in ``generate``
and VLPO's rollouts."""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine_models as tm
import medlvr
from medlvr.engine import EngineHolder, LatentEngine
from medlvr.dropin import LatentSpec
from medlvr.policy import Batch
from medlvr.train.vlpo.rollout import sample_rollouts

# The engine and the callers that generate through it. Not medlvr/ops: its CPU references
# read their own per-step lengths (on CUDA the kernels take them as tensors).
_CALLER_DIRS = tuple(os.path.join(os.path.dirname(medlvr.__file__), d) + os.sep for d in ("engine", "dropin", "train"))
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _caller_frame() -> str | None:
    """file:line of the innermost frame outside torch, when it is the engine's or a caller's
    code (not the HF model the prefill runs, which reads its own values)."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if f.filename.startswith(_TORCH_DIR) or f.filename == __file__:
            continue
        return f"{f.filename}:{f.lineno}" if f.filename.startswith(_CALLER_DIRS) else None
    return None

_aten = torch.ops.aten
_MAX_OPS = {_aten.max.default, _aten.amax.default, _aten.max.dim}


class MaxReads(TorchDispatchMode):
    """Host reads (.item(), int(), bool()) by engine or caller code of a tensor that a max reduction made."""

    def __init__(self):
        super().__init__()
        self.maxima: list[torch.Tensor] = []
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MAX_OPS:
            self.maxima.append(out[0] if isinstance(out, tuple) else out)
        elif func is _aten._local_scalar_dense.default and any(args[0] is m for m in self.maxima):
            where = _caller_frame()
            if where is not None:
                self.reads.append(where)
        return out


def _ragged_batch():
    batch = tm.left_pad([tm.vl_sample((2, 4), 3, seed=1), tm.vl_sample((2, 2), 5, seed=2)])
    assert int((batch["attention_mask"] == 0).sum()) > 0  # ragged: the lengths differ
    return batch


@pytest.fixture(scope="module")
def model():
    return tm.qwen2_5_vl()


@pytest.mark.parametrize("group_size", [None, 2])
def test_generate_reads_the_prompt_maximum_once(model, group_size):
    eng = LatentEngine(model, max_batch=4, max_len=64, max_prompts=2 if group_size else 0)
    with MaxReads() as m:
        eng.generate(_ragged_batch(), k_max=2, max_new_tokens=2, latent_end_id=tm.LATENT_END,
                     group_size=group_size)
    assert len(m.reads) == 1, m.reads


@pytest.mark.parametrize("group_size", [None, 2])
def test_holder_sizes_and_generates_with_one_read(model, group_size):
    holder = EngineHolder(model, len_multiple=1)
    for _ in range(2):  # the first call builds the engine, the second reuses it
        with MaxReads() as m:
            holder.generate(_ragged_batch(), k_max=2, max_new_tokens=2, latent_end_id=tm.LATENT_END,
                            group_size=group_size)
        assert len(m.reads) == 1, m.reads
    assert holder.builds == 1


def test_dropin_generate_reads_once(model):
    spec = LatentSpec.preset("medlvr", start_token=tm.LATENT_START, end_token=tm.LATENT_END, max_steps=2)
    with MaxReads() as m:
        medlvr.generate(model, _ragged_batch(), spec=spec, max_new_tokens=2, stop_ids=[2])
    assert len(m.reads) == 1, m.reads


@pytest.mark.parametrize("k_latent", [0, 2])
def test_rollouts_read_once(model, k_latent):
    with MaxReads() as m:
        sample_rollouts(model, Batch.prompts(_ragged_batch(), k_latent=k_latent), n=2, k_latent=k_latent, latent_sigma=0.1, temperature=1.0,
                        top_p=1.0, max_new_tokens=2, latent_end_id=tm.LATENT_END, stop_id=2, pad_id=0,
                        generator=torch.Generator().manual_seed(0))
    assert len(m.reads) == 1, m.reads
