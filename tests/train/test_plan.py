"""``medlvr plan`` (medlvr/train/plan.py): its parameter accounting against transformers' own
model (meta device), its size of the 7B against the published figure, and its weight,
gradient and Adam bytes against what a real stage-1 step allocates on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medlvr.train.plan import MODES, PlanArgs, gathered_bytes, load_config, parameters, plan, state_bytes

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["default", "qwen2.5-vl-7b"])
def test_parameters_are_transformers_parameters(model):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = load_config(model)
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**json.loads(json.dumps(cfg))))
    want = sorted(tuple(p.shape) for p in hf.parameters())
    assert sorted(p.shape for p in parameters(cfg, lora=False)) == want


def test_7b_size_and_sharding():
    cfg = load_config("qwen2.5-vl-7b")
    n = sum(p.numel for p in parameters(cfg, lora=False))
    assert 8.25e9 < n < 8.35e9  # the Qwen2.5-VL-7B-Instruct model card: 8.29B parameters
    full1, full8 = state_bytes(parameters(cfg, lora=False), "fsdp-full", 1), state_bytes(parameters(cfg, lora=False),
                                                                                          "fsdp-full", 8)
    assert full1["adam"] == 8 * n + 4 * len(parameters(cfg, lora=False))
    assert full8["weights"] == pytest.approx(full1["weights"] / 8, rel=1e-3)  # only the padding differs
    rows = {(r["stage"], r["mode"]): r for r in plan(cfg, PlanArgs(gpus=8))}
    assert {m for _, m in rows} == set(MODES)
    assert rows["sft", "fsdp-full"]["total"] < rows["sft", "ddp-lora"]["total"]  # fp32 base whole vs 1/8
    assert rows["vlpo", "fsdp-full"]["reference"] == full8["weights"]  # a frozen fp32 copy, sharded alike
    lora8 = plan(cfg, PlanArgs(gpus=8, reference="adapter"))[5]
    assert lora8["mode"] == "fsdp-lora" and 0 < lora8["reference"] < 2**23  # a second adapter: ~5 MiB a GPU


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "medlvr.cli", "plan", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_table_json_and_errors():
    r = _cli("--gpus", "8", "--gpu-mem", "80")
    assert r.returncode == 0 and "fsdp-full" in r.stdout and "fits" in r.stdout, r.stderr
    rows = json.loads(_cli("--json", "--model", "default").stdout)
    assert len(rows) == 6 and all(r["total"] > 0 for r in rows)
    bad = _cli("--gpus", "0")
    assert bad.returncode == 2 and "--gpus: expected >= 1" in bad.stderr
    missing = _cli("--model", "/nonexistent/dir")
    assert missing.returncode == 2 and "model:" in missing.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDLVR_MEASURE_PLAN") != "1",
                    reason="allocates ~15 GB of host memory over 3 minutes: set MEDLVR_MEASURE_PLAN=1")
@pytest.mark.parametrize("mode", MODES)
def test_state_bytes_equal_a_real_step(tmp_path, mode):
    """2 decoder layers and 2 vision blocks at the 7B's width (vocabulary 8192 instead of
    152064, to fit this CPU); FSDP on 2 processes. Rank 0 holds the padded (largest) slices."""
    from medlvr.data.synth import synthesize

    data = synthesize(tmp_path / "data", n=4, seed=1, image_size=56, split_fractions=(1.0, 0.0, 0.0))["train"]
    worker = Path(__file__).resolve().parent / "_plan_measure.py"
    from _torchrun import torchrun

    launch = torchrun() if mode.startswith("fsdp") else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([*launch, str(worker), str(tmp_path / "m"), mode, "8192", str(data)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "m.0").read_text())
    params = parameters(got["config"], lora=mode.endswith("lora"))
    want = state_bytes(params, mode, 2 if mode.startswith("fsdp") else 1)
    assert {k: got[k] for k in want} == want
    if mode.startswith("fsdp"):  # the rollout-phase gather, here in fp32 (no mixed precision on the CPU)
        assert got["gathered"] == gathered_bytes(params, 2, elt=4)
