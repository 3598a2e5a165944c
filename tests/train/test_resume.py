"""Checkpoints are atomic and --resume continues exactly: a run stopped mid-way (after a
checkpoint, with more steps done past it) and resumed ends with the same weights, optimizer
and metrics as an uninterrupted run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from _threads import one_thread  # noqa: F401  (autouse fixture)
from medlvr.models import build_default
from medlvr.data.records import load_jsonl
from medlvr.train.loop import LoopConfig, StopTraining
from medlvr.policy import load_trained
from medlvr.policy import build_trainable
from medlvr.train.sft import Stage1Config, train_stage1
from medlvr.data.synth import synthesize


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    paths = synthesize(d, n=24, seed=3, image_size=56, split_fractions=(1.0, 0.0, 0.0))
    return load_jsonl(paths["train"])[0]


def _run(records, out, **kw):
    model, processor = build_default(seed=0)
    lm = build_trainable(model, processor, Stage1Config(k_latent=2, roi_weight=1.0))
    cfg = LoopConfig(out_dir=str(out), max_steps=6, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2,
                     save_every=2, keep_checkpoints=2, progress=False, seed=1, **kw)
    return train_stage1(lm, processor, records, cfg)


def test_resume_is_exact(records, tmp_path):
    # 6 steps x 2 micro-batches x 4 = 48 samples: two epochs of 24, so the epoch boundary and
    # the per-epoch reshuffle are crossed both before and after the resume point.
    full = _run(records, tmp_path / "full")
    with pytest.raises(StopTraining):
        _run(records, tmp_path / "cut", stop_after=3)  # last checkpoint: step 2; step 3 is lost
    ckpts = tmp_path / "cut" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-0000002"
    assert sorted(p.name for p in (ckpts / "step-0000002").iterdir()) == [
        "model.safetensors", "optimizer.pt", "rng-0.pt", "run.json", "scheduler.pt", "state.json"]
    assert not list(ckpts.glob(".tmp-*"))
    resumed = _run(records, tmp_path / "cut", resume="auto")

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed["loss"] == full["loss"] and resumed["epoch"] == full["epoch"] == 1
    rows_full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    # The stopped run logged steps 1..3, the resumed one 3..6 again from step 2's state.
    by_step = {r["step"]: r["loss"] for r in rows_cut}
    assert [r["step"] for r in rows_full] == list(range(1, 7))
    assert all(by_step[r["step"]] == r["loss"] for r in rows_full)

    lm, _, meta = load_trained(tmp_path / "cut" / "final")
    assert meta["stage1"]["k_latent"] == 2
    for n, t in lm.trainable_state_dict().items():
        torch.testing.assert_close(t, a[n], rtol=0, atol=0)


def test_bad_loop_config():
    with pytest.raises(ValueError, match="schedule"):
        LoopConfig(schedule="step")
    with pytest.raises(ValueError, match="metrics"):
        LoopConfig(metrics="metrics.txt")
    import importlib.util

    if not importlib.util.find_spec("tensorboard") and not importlib.util.find_spec("tensorboardX"):
        with pytest.raises(ValueError, match="tensorboard"):
            LoopConfig(report_to="tensorboard")
    with pytest.raises(ValueError, match="max_steps"):
        LoopConfig(max_steps=0)
