"""Stage 1 under accelerate with 2 CPU processes (gloo DDP) equals one process on the same
global batch: same data order (split_batches), per-sample-mean loss (so the DDP gradient mean
is the global mean), same schedule. Runs the real CLI under `accelerate launch`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small CPU: one thread each
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _sft_args(data: Path, out: Path) -> list[str]:
    return ["sft", "--data", str(data), "--out", str(out), "--k-latent", "2", "--steps", "3", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "1", "--seed", "5", "--no-progress",
            "--mixed-precision", "no", "--save-every", "2"]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from medlvr.train.synth import synthesize

    paths = synthesize(tmp_path / "data", n=16, seed=2, image_size=56, split_fractions=(1.0, 0.0, 0.0))
    one = subprocess.run([sys.executable, "-m", "medlvr.cli", *_sft_args(paths["train"], tmp_path / "one")],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "29517", "-m", "medlvr.cli",
                          *_sft_args(paths["train"], tmp_path / "two")],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    ck = tmp_path / "two" / "checkpoints" / "step-0000002"
    assert '"num_processes": 2' in (ck / "state.json").read_text()
    assert (ck / "rng-0.pt").is_file() and (ck / "rng-1.pt").is_file()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)
    # and training did move the weights (the comparison is not between two untouched models)
    from medlvr.models import build_default

    init = dict(build_default(seed=5)[0].named_parameters())
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(init[name], a["model." + name])
