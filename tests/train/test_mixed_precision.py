"""bf16 autocast is a tested mode, not a GPU accident: stage 1 (both modes, LoRA and full),
VLPO (LoRA from a stage-1 run with a projector, and full fine-tuning), evaluation (engine
and HF loop) and the demo run on the CPU under ``--mixed-precision bf16``, the same code
paths a GPU runs by default. Issue 10 found each of these failing on the first GPU run
(fp32 latents beside bf16 vision tokens in the ROI loss; an fp32 projector fed bf16
hidden states; autocast activations handed to the engine's one-dtype kernels)."""
import json
import math

import pytest
import torch

from medlvr.cli import main


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the CLI's --threads sets it process-wide


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp_data")
    # roi-fraction 1: every lesion record carries an ROI box, so the alignment term is live
    assert main(["synth", "--out", str(out), "--n", "16", "--image-size", "56", "--roi-fraction", "1.0",
                 "--split", "0.75", "0", "0.25"]) == 0
    return out


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sft(data, out, *extra):
    assert main(["sft", "--data", str(data / "train.jsonl"), "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--mixed-precision", "bf16", "--no-progress", "--threads", "1", *extra]) == 0
    rows = _metrics(out / "metrics.jsonl")
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    return rows


@pytest.mark.parametrize("mode,extra", [("recurrent", ["--lora", "--projector"]), ("teacher-forced", [])],
                         ids=["recurrent-lora-projector", "teacher-forced-full"])
def test_stage1_under_bf16_autocast(data, tmp_path, mode, extra):
    rows = _sft(data, tmp_path / "s1", "--k-latent", "2", "--mode", mode, *extra)
    assert any(r["roi"] > 0 for r in rows)  # the ROI term ran, in the mixed dtypes autocast gives it
    assert (tmp_path / "s1" / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def stage1_lora(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp_s1")
    _sft(data, out, "--k-latent", "2", "--lora", "--projector")
    return out / "final"


def _vlpo(data, out, *extra):
    assert main(["vlpo", "--data", str(data / "train.jsonl"), "--out", str(out), "--steps", "2",
                 "--batch-prompts", "2", "--n-rollouts", "2", "--max-new-tokens", "4", "--lr", "1e-4",
                 "--mixed-precision", "bf16", "--no-progress", *extra]) == 0
    rows = _metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "final" / "model.safetensors").is_file()


def test_vlpo_lora_from_stage1_under_bf16_autocast(data, stage1_lora, tmp_path):
    _vlpo(data, tmp_path / "s2", "--init", str(stage1_lora))


def test_vlpo_full_finetune_under_bf16_autocast(data, tmp_path):
    _vlpo(data, tmp_path / "s2", "--k-latent", "2")


def test_vlpo_bf16_weights_with_an_fp32_projector(data, stage1_lora, tmp_path):
    """The GPU default: the model loaded in bf16, the stage-1 projector kept in fp32."""
    _vlpo(data, tmp_path / "s2", "--init", str(stage1_lora), "--dtype", "bfloat16")


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_eval_under_bf16_autocast(data, stage1_lora, tmp_path, backend):
    ev = tmp_path / "eval"
    assert main(["eval", "--run", f"s1={stage1_lora}", "--data", str(data / "test.jsonl"), "--out", str(ev),
                 "--max-new-tokens", "3", "--backend", backend, "--mixed-precision", "bf16"]) == 0
    assert json.loads((ev / "accuracy.json").read_text())["s1"]["n"] == 4


@pytest.mark.slow
def test_demo_quick_under_bf16_autocast(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--mixed-precision", "bf16", "--no-progress"]) == 0
    assert "(c) stage 1+2" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"
    assert {"(a) SFT", "(b) stage 1", "(c) stage 1+2"} <= set(summary["accuracy"])
