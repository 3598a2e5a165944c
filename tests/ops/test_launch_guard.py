"""Every Triton launch runs on the device its tensors live on.

Triton launches on the current CUDA device, so each launcher of medlvr.kernels enters
``torch.cuda.device(tensor.device)`` first (medlvr/kernels/_device.py). Checked without a
GPU: the package's ops run on fake tensors on cuda:1 while the current device is unset,
``torch.cuda.device`` is replaced by a recorder of the index it sets, and every launch is
captured with the index current at that moment (tests/ops/_launch_capture.py). A launch
outside the guard records None. On a machine with two GPUs the same holds for real
launches (docs/gpu.md lists it among the GPU checks).
"""
from __future__ import annotations

import pytest

import _compile_workloads as cw
import _launch_capture as lc

CALLS = {
    "decode qwen7b bf16": lambda: cw.decode_step("qwen7b", 8, 4096, "bf16"),
    "decode gpt2 fp32 one split": lambda: cw.decode_step("gpt2", 64, 1024, "fp32"),
    "grouped fold": lambda: cw.grouped_step("qwen7b", 8, 1, 4096, "bf16"),
    "grouped row map": lambda: cw.grouped_step("qwen7b", 16, 1, 4096, "fp32"),
    "roi loss fwd + bwd": lambda: cw.roi_loss(4, "bf16", "area", "cosine", False),
}
KERNELS = {"_rotary_append_kernel", "_decode_attn_stage1", "_decode_attn_stage2", "_add_rmsnorm_kernel",
           "_rmsnorm_feedback_kernel", "_roi_loss_fwd_kernel", "_roi_loss_bwd_latent_kernel",
           "_roi_loss_bwd_vision_kernel"}


@pytest.fixture(scope="module")
def launches():
    out = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(cw, "DEV", "cuda:1")
    try:
        for name, call in CALLS.items():
            with lc.capture() as rec:
                call()
            out[name] = rec.launches
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("name", list(CALLS))
def test_launches_run_under_their_tensors_device(launches, name):
    got = launches[name]
    assert got, "no launch captured: the op did not take the Triton path"
    off = [(la.name, la.device) for la in got if la.device != 1]
    assert not off, off


def test_every_launcher_is_covered(launches):
    assert {la.name for ls in launches.values() for la in ls} == KERNELS
