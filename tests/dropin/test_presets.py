"""Each preset on medlvr equals that system's own loop (medlvr/reference/dropin_loops.py) on a tiny
random model of its architecture: latents, exits and tokens, per sample, at batch 1 and in
ragged batches the originals never ran. fp32, tolerance as tests/engine/test_equivalence.py."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
import medlvr
from medlvr.dropin import LatentSpec
from medlvr.reference import dropin_loops as originals

T, EOS = 5, 2
LATENT = 9  # tiny vocab ids (tests/engine/engine_models.py): 7 start, 8 end, 9 latent


def close(actual, expected, rel=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(1.0, float(expected.abs().max())))


def _check(out, b, latents, tokens):
    n = latents.shape[0]
    assert int(out.num_latent[b]) == n
    if n:
        close(out.latents[b, :n], latents)
    assert torch.all(out.latents[b, n:] == 0)
    assert out.tokens[b, :len(tokens)].tolist() == tokens and int(out.text_lengths[b]) == len(tokens)


# ------------------------------------------------------------------ Coconut (GPT-2)
COCONUT = LatentSpec.preset("coconut", start_token=tm.LATENT_START, end_token=tm.LATENT_END, latent_token=LATENT)


def _coconut_prompt(n_text, n_latent, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(10, tm.VOCAB, (n_text,), generator=g), torch.tensor([tm.LATENT_START]),
                      torch.full((n_latent,), LATENT), torch.tensor([tm.LATENT_END])])


def _right_padded(rows):
    S = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :r.numel()], mask[b, :r.numel()] = r, 1
    return {"input_ids": ids, "attention_mask": mask}  # tokenizers pad GPT-2 on the right


@pytest.fixture(scope="module")
def gpt2():
    return tm.gpt2()


@pytest.mark.parametrize("shapes", [[(6, 3)], [(6, 3), (9, 1), (4, 0), (3, 4)]], ids=["batch1", "ragged"])
def test_coconut(gpt2, shapes):
    rows = [_coconut_prompt(n, k, seed=s) for s, (n, k) in enumerate(shapes)]
    out = medlvr.generate(gpt2, _right_padded(rows), spec=COCONUT, max_new_tokens=T, stop_ids=[EOS])
    for b, ids in enumerate(rows):
        lat, toks = originals.coconut(gpt2, ids, latent_id=LATENT, max_new_tokens=T, eos=EOS)
        _check(out, b, lat, toks)


# ------------------------------------------------------------------ Qwen2.5-VL systems
SAMPLES = [((4, 6), 3, 1), ((2, 2), 6, 2), (None, 4, 3)]


@pytest.fixture(scope="module")
def vl():
    """A tiny Qwen2.5-VL whose <|latent_end|> row of lm_head is steered towards the
    latents of the first sample, so the end-token rule fires at different steps per row."""
    model = tm.qwen2_5_vl()
    ids, pv, grid = tm.vl_sample(*SAMPLES[0][:2], seed=SAMPLES[0][2])
    from medlvr.reference.latent_loop import latent_loop
    ref = latent_loop(model, tm.left_pad([(ids, pv, grid)]), k=6, max_new_tokens=0)
    with torch.no_grad():
        target = ref.step_hidden[0, 2]
        model.lm_head.weight[tm.LATENT_END] = 2 * target / target.norm() ** 2
    return model


def _vl_batch(which):
    return tm.left_pad([tm.vl_sample(hw, n, seed=s) for hw, n, s in (SAMPLES[i] for i in which)])


def _end_argmax(model):
    return lambda h: model.lm_head(h).argmax(-1) == tm.LATENT_END


@pytest.mark.parametrize("preset,k", [("lvr", 6), ("monet", 10)])
@pytest.mark.parametrize("which", [[0], [1], [0, 1, 2]], ids=["batch1a", "batch1b", "ragged"])
def test_end_token_presets(vl, preset, k, which):
    spec = LatentSpec.preset(preset, start_token=tm.LATENT_START, end_token=tm.LATENT_END, max_steps=k)
    out = medlvr.generate(vl, _vl_batch(which), spec=spec, max_new_tokens=T, stop_ids=[EOS])
    for b, i in enumerate(which):
        lat, toks = originals.qwen_vl(vl, _vl_batch([i]), k=k, end_id=tm.LATENT_END, max_new_tokens=T, eos=EOS,
                                      rule=_end_argmax(vl))
        _check(out, b, lat[0], toks[0])
    if which == [0, 1, 2]:
        assert len(set(out.num_latent.tolist())) > 1, "the steered end row should give ragged exits"


def test_lvr_end_distance(vl):
    from medlvr.reference.latent_loop import latent_loop
    ref = latent_loop(vl, _vl_batch([1]), k=6, max_new_tokens=0)
    e_end = ref.latent_mu[0, 3].clone()  # sample 1 reaches it after step 2
    spec = LatentSpec.preset("lvr", start_token=tm.LATENT_START, end_token=tm.LATENT_END, max_steps=6,
                             exit="end_distance", end_embedding=e_end, exit_threshold=1e-3)
    out = medlvr.generate(vl, _vl_batch([0, 1, 2]), spec=spec, max_new_tokens=T, stop_ids=[EOS])
    for b in range(3):
        lat, toks = originals.qwen_vl(vl, _vl_batch([b]), k=6, end_id=tm.LATENT_END, max_new_tokens=T, eos=EOS,
                                      rule=lambda h: (h - e_end).norm(dim=-1) < 1e-3)
        _check(out, b, lat[0], toks[0])
    assert int(out.num_latent[1]) == 3


def test_mirage_batch_global_exit(vl):
    """Mirage's original runs the batch together and leaves latent mode when every row has
    emitted the end token; medlvr's exit_scope='batch' reproduces it on the whole batch."""
    spec = LatentSpec.preset("mirage", start_token=tm.LATENT_START, end_token=tm.LATENT_END)
    batch = _vl_batch([0, 1, 2])
    out = medlvr.generate(vl, batch, spec=spec, max_new_tokens=T, stop_ids=[EOS])
    lats, toks = originals.qwen_vl(vl, batch, k=8, end_id=tm.LATENT_END, max_new_tokens=T, eos=EOS,
                                   rule=_end_argmax(vl), batch_global=True)
    for b in range(3):
        _check(out, b, lats[b], toks[b])
    assert len(set(out.num_latent.tolist())) == 1
