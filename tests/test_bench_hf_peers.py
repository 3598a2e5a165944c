"""The HF StaticCache peers of benchmarks/bench_latent_step.py compute the latent loop
they are timed against (medlvr/engine/hf_loop.py), so their times compare like
with like: same prefill, the same K fed-back latent steps, the same greedy answer.

fp32, tiny random Qwen2.5-VL (tests/engine/engine_models.py). CPU runs the loops eagerly;
on a GPU the decode steps are replayed from CUDA graphs. The StaticCache attends over
its whole (zero-padded, masked) capacity where the DynamicCache has only the filled
positions, so sums differ in order: tolerance 1e-5 on hidden states, tokens exact.
"""
import sys
from pathlib import Path

import pytest
import torch

import _benchmarks
from devices import kernel_devices
from medlvr.engine.hf_loop import latent_loop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))
import engine_models  # noqa: E402


@pytest.fixture(scope="module")
def peers():
    return _benchmarks.load("_hf_peers")


@pytest.mark.parametrize("device", kernel_devices())
def test_static_generate_is_the_latent_loop(peers, device):
    model = engine_models.qwen2_5_vl(seed=1).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, engine_models.VOCAB, (2, 9), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    k, T = 3, 5
    want = latent_loop(model, batch, k=k, max_new_tokens=T, first_token=engine_models.LATENT_END)
    gen = peers.StaticGenerate(model, batch, k=k, max_new_tokens=T, first_token=engine_models.LATENT_END,
                               graph=device == "cuda")
    for _ in range(2):  # a second call reuses the cache (reset + prefill) and the graphs
        tokens = gen()
        assert torch.equal(tokens, want.tokens)
        torch.testing.assert_close(gen.hidden[:, 0], want.step_hidden[:, -1], rtol=1e-5, atol=1e-5)


def test_static_generate_refuses_padding(peers):
    model = engine_models.qwen2_5_vl()
    ids = torch.randint(10, 50, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        peers.StaticGenerate(model, {"input_ids": ids, "attention_mask": mask}, k=1, max_new_tokens=1,
                             first_token=8, graph=False)


@pytest.mark.parametrize("device", kernel_devices())
def test_static_step_rewinds(peers, device):
    # reset() must rewind the write position: a second step from the same input then
    # writes the same slot and reads the same L + 1 positions, giving the same output
    # (without the rewind it would also read the first step's K/V).
    model = engine_models.qwen2_5_vl().to(device)
    step, reset, h = peers.static_step(model, 2, 7, torch.device(device), torch.float32, graph=device == "cuda")
    x = torch.randn_like(h)
    outs = []
    for _ in range(2):
        h.copy_(x)
        reset()
        step()
        outs.append(h.clone())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], x)
    h.copy_(x)
    step()  # no rewind: position L + 1 over L + 2 keys
    assert not torch.allclose(h, outs[0])
