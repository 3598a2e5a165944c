"""Each preset on medlvr equals its system's own loop, written from the original code
(medlvr/reference/dropin_loops.py cites repository, commit, file and function), on a tiny
random fp64 model of the preset's architecture: the latents fed, the latent steps of each
row and the answer tokens, at batch 1 and in a ragged left-padded batch of 3 whose rows
leave the segment at different steps.

The end-token row of lm_head is set (least squares over the hidden states of a fixed
run) so that the end token is the argmax at chosen (row, test) pairs only: the latent
trajectory does not depend on lm_head, so this fixes where each rule fires without
touching what the loops compute."""
from __future__ import annotations

import pytest
import torch

import engine_models as tm
import fp64_models as fm
import medlvr
from medlvr.dropin import LatentSpec
from medlvr.reference import dropin_loops as originals
from medlvr.reference.dropin_loops import drop_last_column
from medlvr.engine.hf_loop import latent_loop

T, EOS = 5, 2
BUDGET = 64  # the originals' token budget (it counts latent placeholders): never the binding limit here
SAMPLES = [((4, 6), 3, 1), ((2, 2), 6, 2), (None, 4, 3)]
LATENT = 9  # tiny vocab ids (tests/engine/engine_models.py): 7 start, 8 end, 9 latent / pad


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * max(1.0, float(expected.abs().max())))


def _check(out, b, latents, answer):
    n = latents.shape[0]
    assert int(out.num_latent[b]) == n, f"row {b}: latent steps"
    if n:
        close(out.latents[b, :n], latents)
    assert torch.all(out.latents[b, n:] == 0)
    L = int(out.text_lengths[b])
    assert out.tokens[b, :L].tolist() == answer[:T], f"row {b}: answer tokens"


def _steer_end(model, batch, picks, k=10, a=30.0):
    """Set lm_head's end row so that the end token is the argmax exactly at ``picks``
    ((row, test) with test 0 the start token's own output, test j the output after the
    j-th latent) and nowhere else on this batch's latent trajectory."""
    f = latent_loop(model, batch, k=k, max_new_tokens=0)
    h = torch.cat([f.latent_hidden[:, :1], f.step_hidden], dim=1)
    y = torch.full(h.shape[:2], -a, dtype=h.dtype)
    for r, t in picks:
        y[r, t] = a
    v = torch.linalg.lstsq(h.reshape(-1, h.shape[-1]), y.reshape(-1, 1)).solution[:, 0]
    with torch.no_grad():
        model.lm_head.weight[tm.LATENT_END] = v
        fires = model.lm_head(h).argmax(-1) == tm.LATENT_END
    assert sorted(map(tuple, fires.nonzero().tolist())) == sorted(picks)
    return f


def _qwen_spec(name, **kw):
    return LatentSpec.preset(name, start_token=tm.LATENT_START, end_token=tm.LATENT_END, **kw)


ROWS = {"batch1": [0], "ragged3": [0, 1, 2]}


# ------------------------------------------------------------------ Coconut (GPT-2)
@pytest.fixture(scope="module")
def gpt2():
    return fm.gpt2()


def _coconut_prompt(n_text, n_latent, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(10, tm.VOCAB, (n_text,), generator=g), torch.tensor([tm.LATENT_START]),
                      torch.full((n_latent,), LATENT), torch.tensor([tm.LATENT_END])])


def _left_padded(rows):
    S = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, S - r.numel():], mask[b, S - r.numel():] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("shapes", [[(6, 3)], [(6, 3), (9, 1), (4, 0)]], ids=["batch1", "ragged3"])
def test_coconut(gpt2, shapes):
    rows = [_coconut_prompt(n, k, seed=s) for s, (n, k) in enumerate(shapes)]
    # eos = row 0's first answer token: Coconut's generate appends it without the eos
    # test, so row 0 goes on (stop_first=False).
    eos = originals.coconut(gpt2, rows[0], latent_id=LATENT, eos=-1, max_new_tokens=1).after[0][0]
    spec = LatentSpec.preset("coconut", start_token=tm.LATENT_START, end_token=tm.LATENT_END, latent_token=LATENT)
    out = medlvr.generate(gpt2, _left_padded(rows), spec=spec, max_new_tokens=T, stop_ids=[eos])
    assert int(out.text_lengths[0]) > 1
    for b, ids in enumerate(rows):
        ref = originals.coconut(gpt2, ids, latent_id=LATENT, eos=eos, max_new_tokens=T)
        L = int(out.text_lengths[b])
        mine = out.tokens[b, :L].tolist()
        if L > 1 and mine[-1] == eos:  # medlvr keeps the stop token, Coconut's generate drops it
            mine = mine[:-1]
        assert int(out.num_latent[b]) == ref.latents[0].shape[0] == shapes[b][1]
        if shapes[b][1]:
            close(out.latents[b, :shapes[b][1]], ref.latents[0])
        assert mine == ref.after[0]


# ------------------------------------------------------------------ Qwen2.5-VL systems
@pytest.fixture(scope="module")
def vl():
    """End token at test 0 of row 1, tests 1-2 of row 2 and test 4 of row 0 (the latents
    with <start> embedded: LVR, Mirage)."""
    model = fm.qwen2_5_vl()
    _steer_end(model, fm.vl_batch(SAMPLES), [(1, 0), (2, 1), (2, 2), (0, 4)])
    return model


@pytest.fixture(scope="module")
def vl_monet():
    """Monet's trajectory starts one position earlier (<start> is not embedded): end
    token after latent 3 of row 0, 5 of row 1, 2 of row 2."""
    model = fm.qwen2_5_vl()
    _steer_end(model, drop_last_column(fm.vl_batch(SAMPLES)), [(0, 3), (1, 5), (2, 2)])
    return model


def _batch(which):
    return fm.vl_batch([SAMPLES[i] for i in which])


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_lvr_end_token(vl, rows):
    """generate's default: the end token is tested at <start> too (row 1: 0 latents), no cap."""
    out = medlvr.generate(vl, _batch(rows), spec=_qwen_spec("lvr"), max_new_tokens=T, stop_ids=[EOS])
    ref = originals.lvr(vl, _batch(rows), strategy="end_token", start_id=tm.LATENT_START, end_id=tm.LATENT_END,
                        eos=EOS, max_new_tokens=BUDGET)
    for b in range(len(rows)):
        assert ref.after[b][0] == tm.LATENT_END
        _check(out, b, ref.latents[b], ref.after[b][1:])
    if len(rows) == 3:
        assert out.num_latent.tolist() == [4, 0, 1]


@pytest.fixture(scope="module")
def vl_late():
    """The end token fires only after latent 7 of row 0, 2 of row 1 and 5 of row 2: row 0's
    segment is longer than the text budget of the test below."""
    model = fm.qwen2_5_vl()
    _steer_end(model, fm.vl_batch(SAMPLES), [(0, 7), (1, 2), (2, 5)])
    return model


@pytest.mark.parametrize("budget", [5, 10])
def test_lvr_latent_count_does_not_depend_on_the_text_budget(vl_late, budget, recwarn):
    """LVR's loop keeps a row in latent mode past its token budget (unfinished = mode | ...):
    row 0 feeds 7 latents with max_new_tokens 5 as with 10, and the original loop, given the
    same budget, agrees. No row reaches step_limit, so nothing is reported."""
    batch = _batch([0, 1, 2])
    out = medlvr.generate(vl_late, batch, spec=_qwen_spec("lvr"), max_new_tokens=budget, stop_ids=[EOS])
    ref = originals.lvr(vl_late, batch, strategy="end_token", start_id=tm.LATENT_START, end_id=tm.LATENT_END,
                        eos=EOS, max_new_tokens=budget)
    assert [v.shape[0] for v in ref.latents] == [7, 2, 5]
    assert out.num_latent.tolist() == [7, 2, 5]
    answers = originals.lvr(vl_late, batch, strategy="end_token", start_id=tm.LATENT_START, end_id=tm.LATENT_END,
                            eos=EOS, max_new_tokens=BUDGET).after  # medlvr's budget counts answer tokens only
    for b in range(3):
        close(out.latents[b, :out.num_latent[b]], ref.latents[b])
        assert out.tokens[b, :int(out.text_lengths[b])].tolist() == answers[b][1:budget + 1], f"row {b}"
    assert out.latent_capped.tolist() == [False, False, False]
    assert not [w for w in recwarn.list if "step_limit" in str(w.message)]


def test_lvr_step_limit_is_reported_when_hit(vl_late):
    """The safety cap cuts rows 0 and 2 (ends at 7 and 5) at 4 latents: a warning names
    step_limit and those rows, and latent_capped marks them; row 1 (end at 2) is untouched."""
    batch = _batch([0, 1, 2])
    spec = _qwen_spec("lvr", step_limit=4)
    with pytest.warns(RuntimeWarning, match=r"rows \[0, 2\] ran step_limit=4 latent steps"):
        out = medlvr.generate(vl_late, batch, spec=spec, max_new_tokens=T, stop_ids=[EOS])
    assert out.num_latent.tolist() == [4, 2, 4]
    assert out.latent_capped.tolist() == [True, False, True]
    ref = originals.lvr(vl_late, batch, strategy="end_token", start_id=tm.LATENT_START, end_id=tm.LATENT_END,
                        eos=EOS, max_new_tokens=BUDGET)
    close(out.latents[1, :2], ref.latents[1])
    close(out.latents[0, :4], ref.latents[0][:4])  # the same trajectory, cut


def test_a_systems_own_cap_is_not_a_warning(vl_monet, recwarn):
    """Monet's LATENT_SIZE is its loop's own cap: reaching it is the original's behaviour,
    marked in latent_capped but not warned about."""
    out = medlvr.generate(vl_monet, _batch([1]), spec=_qwen_spec("monet", max_steps=4), max_new_tokens=T,
                          stop_ids=[EOS])
    assert out.latent_capped.tolist() == [True]
    assert not [w for w in recwarn.list if "step_limit" in str(w.message)]
    fixed = medlvr.generate(vl_monet, _batch([1]), spec=_qwen_spec("lvr-steps", max_steps=3), max_new_tokens=T,
                            stop_ids=[EOS])
    assert fixed.latent_capped.tolist() == [False]  # "fixed" runs its steps by rule


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_lvr_latent_end_distance(vl, rows):
    """decoding_strategy="latent": MSE of the fed latent to the learned end embedding <
    0.02 (the default threshold), then the model's own next token."""
    fixed = latent_loop(vl, fm.vl_batch(SAMPLES), k=6, max_new_tokens=0)
    e_end = fixed.latents[1, 2] + 0.1  # row 1's third fed latent at MSE 0.01
    spec = _qwen_spec("lvr-latent", end_embedding=e_end, max_steps=6)
    out = medlvr.generate(vl, _batch(rows), spec=spec, max_new_tokens=T, stop_ids=[EOS])
    ref = originals.lvr(vl, _batch(rows), strategy="distance", start_id=tm.LATENT_START, end_id=tm.LATENT_END,
                        eos=EOS, max_new_tokens=BUDGET, steps=6, end_embedding=e_end)
    for b in range(len(rows)):
        _check(out, b, ref.latents[b], ref.after[b])
    if len(rows) == 3:
        assert out.num_latent.tolist() == [6, 3, 6]


def test_lvr_steps(vl):
    """decoding_strategy="steps" (its evaluation's): a fixed count, then the model's own token."""
    batch = _batch([0, 1, 2])
    out = medlvr.generate(vl, batch, spec=_qwen_spec("lvr-steps", max_steps=3), max_new_tokens=T, stop_ids=[EOS])
    ref = originals.lvr(vl, batch, strategy="steps", start_id=tm.LATENT_START, end_id=tm.LATENT_END, eos=EOS,
                        max_new_tokens=BUDGET, steps=3)
    for b in range(3):
        _check(out, b, ref.latents[b], ref.after[b])


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_monet(vl_monet, rows):
    """<start> is never embedded: its position takes the hidden state that sampled it."""
    out = medlvr.generate(vl_monet, _batch(rows), spec=_qwen_spec("monet"), max_new_tokens=T, stop_ids=[EOS])
    ref = originals.monet(vl_monet, _batch(rows), start_id=tm.LATENT_START, end_id=tm.LATENT_END, latent_size=10,
                          eos=EOS, max_new_tokens=BUDGET)
    for b in range(len(rows)):
        assert ref.after[b][0] == tm.LATENT_END
        _check(out, b, ref.latents[b], ref.after[b][1:])
    if len(rows) == 3:
        assert out.num_latent.tolist() == [3, 5, 2]
    embedded = medlvr.generate(vl_monet, _batch(rows), spec=_qwen_spec("monet", start_embedded=True),
                               max_new_tokens=T, stop_ids=[EOS])
    assert not torch.allclose(embedded.latents[0, 0], out.latents[0, 0])


def test_monet_cap_forces_the_end_token(vl_monet):
    out = medlvr.generate(vl_monet, _batch([1]), spec=_qwen_spec("monet", max_steps=4), max_new_tokens=T,
                          stop_ids=[EOS])
    ref = originals.monet(vl_monet, _batch([1]), start_id=tm.LATENT_START, end_id=tm.LATENT_END, latent_size=4,
                          eos=EOS, max_new_tokens=BUDGET)
    assert ref.after[0][0] == tm.LATENT_END and int(out.num_latent[0]) == 4
    _check(out, 0, ref.latents[0], ref.after[0][1:])


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_mirage(vl, rows):
    """One latent mode for the batch. Ragged: row 1 fires at <start>, row 2 at tests 1 and
    2, so the running count reaches 3 at test 2 on row 2, before row 0 ever fired; rows 0
    and 1 then feed the latent pad id, row 2 the end token."""
    spec = _qwen_spec("mirage", latent_pad_token=LATENT)
    out = medlvr.generate(vl, _batch(rows), spec=spec, max_new_tokens=T, stop_ids=[EOS])
    ref = originals.mirage(vl, _batch(rows), start_id=tm.LATENT_START, end_id=tm.LATENT_END, latent_pad_id=LATENT,
                           eos=EOS, max_new_tokens=BUDGET)
    for b in range(len(rows)):
        _check(out, b, ref.latents[b], ref.after[b][1:])
    if len(rows) == 3:
        assert [a[0] for a in ref.after] == [LATENT, LATENT, tm.LATENT_END]
        assert out.num_latent.tolist() == [2, 2, 2]
    else:
        assert out.num_latent.tolist() == [4]


def test_mirage_per_sample_option(vl):
    """medlvr's addition: each row leaves on its own end token (and feeds it)."""
    spec = _qwen_spec("mirage", exit_scope="sample", after_exit="end_token", latent_pad_token=None)
    out = medlvr.generate(vl, _batch([0, 1, 2]), spec=spec, max_new_tokens=T, stop_ids=[EOS])
    assert out.num_latent.tolist() == [4, 0, 1]


class LVRHead(torch.nn.Module):
    """LVR's "simple" head (src/model/lvr_heads.py, LVRHead): LayerNorm, Linear, GELU, Linear."""

    def __init__(self, d):
        super().__init__()
        self.ln_q = torch.nn.LayerNorm(d, eps=1e-6)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d))

    def forward(self, x):
        return self.mlp(self.ln_q(x))


@pytest.mark.parametrize("preset,strategy", [("lvr-steps", "steps"), ("lvr", "end_token")])
def test_lvr_head(vl, preset, strategy):
    """The head is not applied to the first latent and its output also feeds lm_head (the
    exit test and the first answer token); batch 1, as LVR's head forward runs."""
    torch.manual_seed(0)
    head = LVRHead(64).double().eval()
    kw = dict(projector=head, project_first=False, projector_logits=True)
    spec = _qwen_spec(preset, max_steps=3, **kw) if preset == "lvr-steps" else _qwen_spec(preset, **kw)
    out = medlvr.generate(vl, _batch([0]), spec=spec, max_new_tokens=T, stop_ids=[EOS])
    ref = originals.lvr(vl, _batch([0]), strategy=strategy, start_id=tm.LATENT_START, end_id=tm.LATENT_END, eos=EOS,
                        max_new_tokens=BUDGET, steps=3, head=head)
    answer = ref.after[0] if strategy == "steps" else ref.after[0][1:]
    _check(out, 0, ref.latents[0], answer)
    plain = medlvr.generate(vl, _batch([0]), spec=spec.replace(project_first=True, projector_logits=False),
                            max_new_tokens=T, stop_ids=[EOS])
    assert not torch.allclose(plain.latents[0, 0], out.latents[0, 0])
