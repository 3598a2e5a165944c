"""Stage-1 latent math on the embedded model in fp32: the recurrent KV-cache forward equals the
Coconut-style K+1 full passes, a ragged batch equals its samples one by one, one full pass with
the recurrence's latents reproduces it (the VLPO re-scoring path), and the loss terms."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from medlvr.models import build_default, latent_token_ids
from medlvr.models.hf import vision_tokens
from medlvr.reference.roi_align import roi_align_loss_ref
from medlvr.models import qwen_vl
from medlvr.policy import latent
from medlvr.train.sft import roi, stage1_loss
from medlvr.data.collate import collate
from medlvr.data.records import ROI, Record
from medlvr.train.vlpo.rollout import Rollouts, policy_states, prompt_inputs
from medlvr.policy import LatentLM, build_trainable, roi_bins
from medlvr.train.sft import Stage1Config

from _latent_batches import make_batch
from _threads import one_thread  # noqa: F401  (autouse fixture)

QUESTIONS = ("what is it?", "is the lesion on the left side?", "organ?")
ANSWERS = ("yes", "no it is not", "liver")
SIZES = ((100, 100), (60, 90), (120, 80))


@pytest.fixture(scope="module")
def mp():
    model, processor = build_default(seed=0)
    return model.float().eval(), processor


@pytest.mark.parametrize("k", [1, 3, 4])
def test_recurrent_equals_coconut_full_passes(mp, k):
    model, processor = mp
    batch = make_batch(processor, k=k)
    rec = latent.recurrent_forward(model, batch, k=k, return_logits=True)
    ref = latent.coconut_reference(model, batch, k=k)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(rec.logits[valid], ref.logits[valid], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(rec.latent_hidden, ref.latent_hidden, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(rec.ce, ref.ce, rtol=1e-5, atol=1e-5)


def test_recurrent_gradients_equal_coconut(mp):
    model, processor = mp
    batch = make_batch(processor, k=3)
    params = [model.model.language_model.layers[0].self_attn.q_proj.weight, model.lm_head.weight,
              model.model.visual.merger.mlp[0].weight]
    grads = []
    for fn in (latent.recurrent_forward, latent.coconut_reference):
        out = fn(model, batch, k=3)
        align = roi.roi_alignment(out.latent_hidden, out.vision_tokens, batch.roi_sample, batch.roi_geometry)
        loss = out.ce.mean() + align.mean()
        grads.append(torch.autograd.grad(loss, params))
    for g_rec, g_ref in zip(*grads):
        torch.testing.assert_close(g_rec, g_ref, rtol=1e-4, atol=1e-6)


def test_batch_equals_per_sample(mp):
    model, processor = mp
    k = 3
    batch = make_batch(processor, k=k)
    P = batch.latent_start
    prompt_lens, lens = batch.attention_mask[:, :P].sum(1), batch.attention_mask[:, P:].sum(1)
    assert len(set(prompt_lens.tolist())) == 3 and len(set(lens.tolist())) > 1  # ragged prompts and answers
    full = latent.recurrent_forward(model, batch, k=k)
    for i in range(3):
        one = make_batch(processor, k=k, questions=[QUESTIONS[i]], answers=[ANSWERS[i]], sizes=[SIZES[i]], rois=(),
                         image_seeds=[i])
        o = latent.recurrent_forward(model, one, k=k)
        torch.testing.assert_close(o.ce[0], full.ce[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.latent_hidden[0], full.latent_hidden[i], rtol=1e-5, atol=2e-5)


def test_plain_sft_batch_equals_per_sample(mp):
    # K = 0 (plain SFT): each row's CE and the gradient of the batch mean do not depend on the
    # pads around it (left before the prompt, right after the answer), against each record run
    # alone with no pad at all.
    model, processor = mp
    w = model.model.language_model.layers[0].mlp.down_proj.weight
    batch = make_batch(processor, k=0)
    m = batch.attention_mask
    assert (m[:, 0] == 0).sum() == 2 and (m[:, -1] == 0).sum() == 2  # left pads and right pads
    full = latent.forward_with_latents(model, batch, None, k=0)
    g_full = torch.autograd.grad(full.ce.mean(), w)[0]
    g_sum = torch.zeros_like(w)
    for i in range(3):
        one = make_batch(processor, k=0, questions=[QUESTIONS[i]], answers=[ANSWERS[i]], sizes=[SIZES[i]], rois=(),
                         image_seeds=[i])
        assert one.attention_mask.all()
        o = latent.forward_with_latents(model, one, None, k=0)
        torch.testing.assert_close(o.ce[0], full.ce[i], rtol=1e-5, atol=1e-5)
        g_sum += torch.autograd.grad(o.ce[0], w)[0] / 3
    torch.testing.assert_close(g_full, g_sum, rtol=1e-4, atol=1e-6)


def test_one_pass_with_fed_latents_reproduces_recurrence(mp):
    """VLPO's re-scoring: a full forward with the rollout's z gives the same logits, and
    latent_mu (h at s0 + t - 1) equals the h that produced each z."""
    model, processor = mp
    k = 4
    batch = make_batch(processor, k=k)
    rec = latent.recurrent_forward(model, batch, k=k, return_logits=True)
    one = latent.forward_with_latents(model, batch, rec.latent_inputs, k=k, return_logits=True, return_hidden=True)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(one.logits[valid], rec.logits[valid], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(latent.latent_mu(one.hidden, batch.latent_start, k), rec.latent_hidden,
                               rtol=1e-5, atol=2e-5)
    # z_0 is the hidden state at <|latent_start|>, the position just before the first latent.
    s0 = batch.latent_start
    ids = batch.input_ids
    start_id = processor.tokenizer.convert_tokens_to_ids("<|latent_start|>")
    assert all(int(ids[b, s0 - 1]) == start_id for b in range(ids.shape[0]))
    torch.testing.assert_close(rec.latent_inputs[:, 0], one.hidden[torch.arange(3), s0 - 1], rtol=1e-5, atol=2e-5)


def test_roi_alignment_per_sample(mp):
    model, processor = mp
    k = 4
    batch = make_batch(processor, k=k)  # sample 0: one ROI, sample 1: none, sample 2: two ROIs
    out = latent.recurrent_forward(model, batch, k=k)
    per = roi.roi_alignment(out.latent_hidden, out.vision_tokens, batch.roi_sample, batch.roi_geometry)
    assert per.shape == (3,) and per[1] == 0 and per[0] > 0 and per[2] > 0
    rows = roi_align_loss_ref(out.latent_hidden[batch.roi_sample], out.vision_tokens, batch.image_grid_thw,
                              batch.roi_boxes, batch.roi_image, bins=(2, 2), reduction="none")
    torch.testing.assert_close(per[0], rows[0].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per[2], rows[1:].mean(), rtol=1e-5, atol=1e-6)


def test_teacher_forced_feeds_pooled_targets(mp):
    model, processor = mp
    k = 4
    batch = make_batch(processor, k=k)
    vis = vision_tokens(model, batch.pixel_values, batch.image_grid_thw)
    tg = roi.pooled_roi_targets(vis, batch, k=k, merge=2, family=qwen_vl)
    from medlvr.reference.roi_align import roi_pool_targets_ref

    ref = roi_pool_targets_ref(vis, batch.image_grid_thw, batch.roi_boxes, batch.roi_image, bins=(2, 2))
    torch.testing.assert_close(tg[0], ref[0])  # sample 0's only box
    torch.testing.assert_close(tg[2], ref[1])  # sample 2's FIRST box
    n1 = int(batch.image_grid_thw[1].prod()) // 4
    start1 = int(batch.image_grid_thw[0].prod()) // 4
    torch.testing.assert_close(tg[1], vis[start1:start1 + n1].mean(0).expand(k, -1))  # no ROI: mean token
    lm = LatentLM(model, Stage1Config(k_latent=k, mode="teacher-forced"))
    loss, res = stage1_loss(lm, batch)
    assert torch.isfinite(loss) and res["roi"] > 0


def test_loss_is_linear_in_samples(mp):
    """loss(batch) = mean of per-sample losses: what makes DDP shards equal one process."""
    model, processor = mp
    k = 2
    lm = LatentLM(model, Stage1Config(k_latent=k, roi_weight=0.5))
    whole = stage1_loss(lm, make_batch(processor, k=k))[0]
    parts = []
    for i in range(3):
        rois = tuple((0, r[1]) for r in ((0, (10.0, 20.0, 70.0, 90.0)), (2, (0.0, 0.0, 50.0, 40.0)),
                                         (2, (30.0, 30.0, 100.0, 100.0))) if r[0] == i)
        one = make_batch(processor, k=k, questions=[QUESTIONS[i]], answers=[ANSWERS[i]], sizes=[SIZES[i]],
                         rois=rois, image_seeds=[i])
        parts.append(stage1_loss(lm, one)[0])
    torch.testing.assert_close(whole, torch.stack(parts).mean(), rtol=1e-5, atol=1e-6)


def test_lora_trains_only_adapters_and_latent_rows():
    model, processor = build_default(seed=0)
    lm = build_trainable(model, processor, Stage1Config(k_latent=2, lora=True, lora_r=4, lora_alpha=8))
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens" in n for n in names), names[:5]
    assert any("q_proj" in n for n in names) and not any("visual" in n for n in names)
    batch = make_batch(processor, k=2)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(4):
        loss = stage1_loss(lm, batch)[0]
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(stage1_loss(lm, batch)[0]) < first


def test_roi_bins_and_bad_config():
    assert roi_bins(1) == (1, 1) and roi_bins(4) == (2, 2) and roi_bins(8) == (2, 4) and roi_bins(6) == (2, 3)
    with pytest.raises(ValueError, match="k"):
        roi_bins(0)
    with pytest.raises(ValueError, match="mode"):
        Stage1Config(mode="coconut")
    with pytest.raises(ValueError, match="k_latent"):
        Stage1Config(k_latent=-1)


def test_recurrent_rejects_a_batch_off_the_layout(mp):
    model, processor = mp
    batch = make_batch(processor, k=2)
    P = batch.latent_start
    for col, what in ((P - 1, "does not end in column latent_start - 1"), (P + 1, "padded latent column"),
                      (P + 2, "suffix that is not right-padded")):
        am = batch.attention_mask.clone()
        am[1, col] = 0  # row 1 has the longest answer: a hole in its prefix end, latents or suffix
        with pytest.raises(ValueError, match=f"attention_mask.*{what}"):
            latent.recurrent_forward(model, replace(batch, attention_mask=am), k=2)
    am = batch.attention_mask.clone()
    am[int(am[:, :P].sum(1).argmax()), P - 3] = 0  # a hole inside the longest prompt
    with pytest.raises(ValueError, match="attention_mask.*prefix that is not left-padded"):
        latent.forward_with_latents(model, replace(batch, attention_mask=am), torch.zeros(3, 2, 8), k=2)
    with pytest.raises(ValueError, match="latent_start"):
        latent.recurrent_forward(model, replace(batch, latent_start=batch.input_ids.shape[1]), k=2)


def _ragged_records(tmp_path):
    """Three records whose prompts (one with two images) and answers all differ in length."""
    for name, (w, h) in (("a.png", (112, 84)), ("b.png", (56, 140))):
        Image.fromarray((np.random.default_rng(w).random((h, w, 3)) * 255).astype("uint8")).save(tmp_path / name)
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    return [Record(id="0", images=[a], question="Is there a lesion?", options=None, answer="yes",
                   rois=[ROI(0, (10.0, 10.0, 60.0, 50.0))]),
            Record(id="1", images=[b, a], question="Where is the lesion, and how large is it compared to the liver?",
                   options=["upper left", "lower right"], answer="lower right, and about a third of it", rois=[]),
            Record(id="2", images=[b], question="Which organ is shown here?", options=None, answer="the spleen",
                   rois=[ROI(0, (0.0, 20.0, 40.0, 100.0))])]


def test_recurrent_equals_coconut_on_a_collated_ragged_batch(mp, tmp_path):
    # The training path end to end: collate's batch (prompts of different lengths, one with two
    # images; answers of different lengths) through the recurrence and through K+1 full passes,
    # in fp32 and in bf16 autocast; the left-pad query rows (they see no key) put no NaN into
    # the loss or the gradients.
    model, processor = mp
    recs = _ragged_records(tmp_path)
    k = 3
    batch = collate(recs, processor, k_latent=k, with_answer=True, latent_token_ids=latent_token_ids(processor))
    P = batch.latent_start
    assert len(set(batch.attention_mask[:, :P].sum(1).tolist())) == 3
    assert len(set(batch.attention_mask[:, P:].sum(1).tolist())) == 3
    valid = batch.attention_mask.bool()
    rec = latent.recurrent_forward(model, batch, k=k, return_logits=True)
    ref = latent.coconut_reference(model, batch, k=k)
    torch.testing.assert_close(rec.logits[valid], ref.logits[valid], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(rec.latent_hidden, ref.latent_hidden, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(rec.ce, ref.ce, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            outs = [fn(model, batch, k=k) for fn in (latent.recurrent_forward, latent.coconut_reference)]
            losses = [o.ce.mean() + roi.roi_alignment(o.latent_hidden, o.vision_tokens, batch.roi_sample,
                                                      batch.roi_geometry).mean() for o in outs]
        for loss in losses:
            assert torch.isfinite(loss)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_vlpo_scoring_pass_reads_the_training_layout(mp, tmp_path):
    # VLPO scores a rollout as [collated prompt | z | <|latent_end|> | answer] (rollout.policy_states).
    # Fed the training batch's own answers and the same z, that pass is the training batch's full
    # forward column for column: the same answer-predicting states and the same mu.
    model, processor = mp
    recs = _ragged_records(tmp_path)
    ids = latent_token_ids(processor)
    k = 3
    train = collate(recs, processor, k_latent=k, with_answer=True, latent_token_ids=ids)
    prompts = collate(recs, processor, k_latent=k, with_answer=False, latent_token_ids=ids)
    P = prompts.input_ids.shape[1]
    a0 = P + k + 1  # first answer column
    tokens, keep = train.input_ids[:, a0:], train.attention_mask[:, a0:].bool()
    assert keep[:, 0].all()  # every row's answer starts in column P + K + 1: all three rows are compared
    z = torch.randn(3, k, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(3, tokens.shape[1])
    ro = Rollouts(prompt=prompt_inputs(model, prompts), latents=z, latent_logprobs=torch.zeros(3, k), tokens=tokens,
                  token_logprobs=zeros, token_mask=keep, stopped=keep.any(1), n=1)
    states = policy_states(model, ro, latent_end_id=ids.end, latent_sigma=0.5)
    full = latent.forward_with_latents(model, train, z, k=k, return_hidden=True)
    torch.testing.assert_close(states.answer[keep], full.hidden[:, a0 - 1:-1][keep], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(states.mu, full.latent_hidden, rtol=1e-5, atol=2e-5)
