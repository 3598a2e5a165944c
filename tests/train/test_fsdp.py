"""``medlvr sft --fsdp`` and ``medlvr vlpo --fsdp`` (FSDP2, medlvr/policy/fsdp.py) on 2 CPU
processes (gloo), full fine-tuning and LoRA (+ latent-token rows and the projector).

Stage 1 is compared with one unsharded process on the same global batch; VLPO with the same
2 processes under DDP (each rank draws its own prompts and noise, so one process would
train on other data).

What must hold:
- the weights after 3 steps equal the 1-process run's (fp32; only the reduction order of the
  gradient mean differs);
- the fused loss ran on the sharded lm_head (a spy in tests/train/_fsdp_worker.py:
  the head's parameter is a DTensor holding V/2 rows, the op got the full (V, D) weight that
  FSDP gathered, as a plain tensor);
- a sharded checkpoint resumes to the same final weights, bit for bit;
- the final run folder loads with medlvr (load_trained) and with plain transformers / peft
  (its hf/ folder), to the same logits.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _torchrun import torchrun
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_fsdp_worker.py"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on the CPU: the comparison is of the sharding
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _args(data: Path, out: Path, lora: bool) -> list[str]:
    return ["sft", "--data", str(data), "--out", str(out), "--k-latent", "2", "--steps", "3", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "1", "--seed", "5", "--no-progress",
            "--mixed-precision", "no", "--save-every", "2", "--adam-eps", "1e-6", "--projector",
            *(["--lora"] if lora else [])]


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def _two(args: list[str], spy: Path, cwd: Path) -> None:
    _run([*torchrun(), str(WORKER), str(spy), *args, "--fsdp"], cwd)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_two_processes_match_one(tmp_path, lora):
    from medlvr.data.synth import synthesize

    data = synthesize(tmp_path / "data", n=16, seed=2, image_size=56, split_fractions=(1.0, 0.0, 0.0))["train"]
    _run([sys.executable, "-m", "medlvr.cli", *_args(data, tmp_path / "one", lora)], tmp_path)
    _two(_args(data, tmp_path / "two", lora), tmp_path / "spy", tmp_path)

    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    if lora:  # LoRA A/B, the latent-token rows and the projector, nothing else
        assert any("lora_A" in k for k in a) and any("trainable_tokens_delta" in k for k in a)
        assert all("lora_" in k or "trainable_tokens" in k or k.startswith("projector.") for k in a)
    # Same update, up to the order in which the two halves' gradients are summed: measured
    # 6e-6 (full) / 1.4e-6 (LoRA) max abs against a 3-step update of norm ~5 (full). A rank
    # that trained on its half alone, a shard left unsynchronised, or ranks that started from
    # different inits differ by 1e-2 or more.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 5e-5, f"2-process FSDP weights differ from 1 process by {worst:.2e} (max abs)"
    before = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000002" / "model.safetensors"))
    moved = max(float((a[k] - before[k]).abs().max()) for k in a)
    assert moved > 1e-3, "the last step did not move the weights"

    _check_spy(tmp_path / "spy")
    _check_resume(data, tmp_path, lora)
    _check_loads(tmp_path / "two" / "final", lora)


def _check_spy(spy: Path) -> None:
    V, D = 1024, 128  # the embedded model's vocabulary and width (medlvr/models/assets/config.json)
    for rank in (0, 1):
        calls = json.loads(Path(f"{spy}.{rank}").read_text())
        # 3 steps x 2 micro-batches, one fused loss each
        assert len(calls) == 6, calls
        for c in calls:
            assert c["head_sharded"] and c["param_is_dtensor"] and c["param_local_shape"] == [V // 2, D], c
            assert not c["op_weight_is_dtensor"] and c["op_weight_shape"] == [V, D], c


def _check_resume(data: Path, tmp_path: Path, lora: bool) -> None:
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["num_processes"] == 2 and state["optimizer"] == "full"
    _two([*_args(data, tmp_path / "resumed", lora), "--resume", str(ckpt)], tmp_path / "spy-resumed", tmp_path)
    a = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: a resumed sharded run differs from the uninterrupted one"
    # its optimizer state is keyed by name, not by index: an unsharded run must not read it
    r = subprocess.run([sys.executable, "-m", "medlvr.cli", *_args(data, tmp_path / "unsharded", lora), "--resume",
                        str(ckpt)], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 2 and "resume it with the same --fsdp setting" in r.stderr, r.stderr[-2000:]


def _check_loads(final: Path, lora: bool) -> None:
    """model.safetensors through medlvr, hf/ through plain transformers (+ peft): same logits."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medlvr.models import build_default
    from medlvr.policy import load_trained

    lm, _, _ = load_trained(final)
    ids = torch.tensor([[1, 7, 9, 11, 13, 17, 19]])
    with torch.no_grad():
        want = lm.model(input_ids=ids).logits
    if lora:
        from peft import PeftModel

        base = build_default(seed=5)[0]  # the run's base: the embedded model, init seed 5
        plain = PeftModel.from_pretrained(base, str(final / "hf"))
    else:
        plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(final / "hf"))
    plain.eval()
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())


def test_fsdp_refused_by_an_objective_that_cannot_shard(tmp_path):
    from medlvr.train.loop import LoopConfig, train_loop

    class Plain:
        module = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="fsdp: Plain does not run sharded"):
        train_loop(Plain(), LoopConfig(out_dir=str(tmp_path), max_steps=1, fsdp=True, progress=False),
                   metrics_path=None)


def _vlpo_args(data: Path, out: Path, lora: bool) -> list[str]:
    # 2 steps of 2 PPO epochs: the second epoch scores with the weights the first one updated.
    # LoRA: a fresh adapter, the KL reference is that adapter switched off; full: no KL.
    return ["vlpo", "--data", str(data), "--out", str(out), "--n-rollouts", "2", "--k-latent", "2",
            "--batch-prompts", "2", "--steps", "2", "--max-new-tokens", "3", "--ppo-epochs", "2", "--seed", "3",
            "--no-progress", "--mixed-precision", "no",
            *(["--lora", "--lr", "1e-2"] if lora else ["--kl-beta", "0", "--lr", "1e-3"])]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_vlpo_fsdp_matches_ddp(tmp_path, lora):
    """Rollouts on the gathered weights, the reference pass, the fused VLPO loss on the
    sharded head: the same update as DDP on the same ranks. The worker's reward varies with
    the sampled text, so the random model's groups have advantages."""
    from medlvr.data.synth import synthesize

    data = synthesize(tmp_path / "data", n=8, seed=2, image_size=56, split_fractions=(1.0, 0.0, 0.0))["train"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        _run([*torchrun(), str(WORKER), str(tmp_path / f"spy-{name}"),
              *_vlpo_args(data, tmp_path / name, lora), *extra], tmp_path)
    a = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 5e-6, f"FSDP VLPO differs from DDP VLPO by {worst:.2e} (max abs)"
    key = next(k for k in a if ("lora_B" if lora else "lm_head") in k)
    if lora:  # lora_B starts at 0: it moved
        assert float(a[key].abs().max()) > 1e-3
    V, D = 1024, 128
    for rank in (0, 1):
        calls = json.loads(Path(f"{tmp_path / 'spy-fsdp'}.{rank}").read_text())
        assert len(calls) == 4 and all(c["op"] == "medlvr.train.vlpo.step" for c in calls), calls  # 2 steps x 2
        assert all(c["head_sharded"] and not c["op_weight_is_dtensor"] and c["op_weight_shape"] == [V, D]
                   for c in calls), calls
        # the first epoch of a step runs inside the rollout gather; the second on the shard,
        # which FSDP gathered around the op
        assert [c["param_is_dtensor"] for c in calls] == [False, True, False, True], calls
        assert all(c["param_local_shape"] == [V // 2, D] for c in calls if c["param_is_dtensor"]), calls


def test_vlpo_fsdp_refuses_a_copied_reference(tmp_path):
    """Full fine-tuning with a KL term needs a frozen copy of the policy, which is not sharded."""
    from medlvr.data.synth import synthesize

    data = synthesize(tmp_path / "data", n=2, seed=2, image_size=56, split_fractions=(1.0, 0.0, 0.0))["train"]
    r = subprocess.run([sys.executable, "-m", "medlvr.cli", "vlpo", "--data", str(data), "--out", str(tmp_path / "o"),
                        "--n-rollouts", "2", "--k-latent", "2", "--batch-prompts", "1", "--steps", "1",
                        "--max-new-tokens", "2", "--no-progress", "--fsdp"],
                       env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "frozen-copy reference is not sharded" in r.stderr, r.stderr[-2000:]
