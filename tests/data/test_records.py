"""JSONL validation, collate (layout, labels, padding, ROI rescaling) and answer scoring."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medlvr.models import build_default, latent_token_ids
from medlvr.data.collate import collate
from medlvr.policy import IGNORE_INDEX
from medlvr.data.records import ROI, DataError, Record, load_jsonl, write_jsonl
from medlvr.data.answers import format_question, normalize_answer, score


@pytest.fixture(scope="module")
def default():
    return build_default(seed=0)


def _png(path, w, h, seed=0):
    Image.fromarray((np.random.default_rng(seed).random((h, w)) * 255).astype("uint8")).save(path)
    return path


def _good(**kw):
    d = dict(id="r1", images=["a.png"], question="Is there a lesion?", answer="yes",
             rois=[{"image": 0, "box": [10, 20, 110, 120]}], split="train")
    d.update(kw)
    return d


def _write(path, objs):
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return path


@pytest.fixture()
def data_dir(tmp_path):
    _png(tmp_path / "a.png", 224, 224)
    _png(tmp_path / "b.png", 300, 150, seed=1)
    return tmp_path


def test_valid_file_loads_with_relative_paths(data_dir):
    f = _write(data_dir / "d.jsonl", [
        _good(),
        _good(id="r2", images=["b.png", "a.png"], options=["upper left", "Lower Right"], answer="lower right",
              rois=[{"image": 1, "box": [0, 0, 224, 224]}], split="val", qtype="location"),
        _good(id="r3", rois=[]),
    ])
    recs, rep = load_jsonl(f)
    assert rep.n_bad == 0 and rep.total == 3 and len(recs) == 3
    assert recs[1].images[0] == str(data_dir / "b.png") and recs[1].rois == [ROI(1, (0.0, 0.0, 224.0, 224.0))]
    assert recs[0].source == "d" and recs[1].qtype == "location"
    assert [r.id for r in load_jsonl(f, split="val")[0]] == ["r2"]
    # write_jsonl round-trips (paths relative to the new file's directory).
    write_jsonl(data_dir / "copy.jsonl", recs)
    again, _ = load_jsonl(data_dir / "copy.jsonl")
    assert again == recs


BAD = [
    (_good(images=["missing.png"]), "images[0]", "not found"),
    (_good(rois=[{"image": 0, "box": [10, 20, 300, 120]}]), "rois[0].box", "outside image"),
    (_good(rois=[{"image": 0, "box": [50, 20, 10, 120]}]), "rois[0].box", "x0 < x1"),
    (_good(rois=[{"image": 1, "box": [1, 1, 2, 2]}]), "rois[0].image", "image index"),
    (_good(rois=[{"image": 0, "box": [1, 2, 3]}]), "rois[0].box", "4 numbers"),
    (_good(answer="  "), "answer", "empty"),
    (_good(answer=None), "answer", "missing"),
    (_good(options=["no", "maybe"]), "answer", "not one of the options"),
    (_good(options=["yes"]), "options", ">= 2"),
    (_good(question=""), "question", "empty"),
    (_good(images=[]), "images", "non-empty"),
    (_good(split="dev"), "split", "one of"),
    ('{"id": "x", "images": ', "<json>", "invalid JSON"),
    ("[1, 2]", "<record>", "JSON object"),
]


@pytest.mark.parametrize("obj,field,msg", BAD)
def test_bad_record_names_file_line_field(data_dir, obj, field, msg):
    f = _write(data_dir / "bad.jsonl", [_good(id="ok"), obj])
    with pytest.raises(DataError) as e:
        load_jsonl(f)
    assert (e.value.line, e.value.field) == (2, field)
    assert str(e.value).startswith(f"{f}:2: field '{field}'") and msg in str(e.value)


def test_skip_bad_counts_and_lists_every_skipped_line(data_dir):
    f = _write(data_dir / "mixed.jsonl", [_good(id="a"), _good(id="b", answer=""), "", _good(id="a"),
                                          _good(id="c", images=["nope.png"]), _good(id="d")])
    recs, rep = load_jsonl(f, skip_bad=True)
    assert [r.id for r in recs] == ["a", "d"]
    assert rep.total == 5 and rep.n_bad == 3 and rep.n_good == 2
    assert [(ln, fld) for ln, fld, _ in rep.skipped] == [(2, "answer"), (4, "id"), (5, "images[0]")]
    text = str(rep)
    assert "3 bad of 5" in text and f"{f}:4: field 'id'" in text


def test_evaluation_fields_round_trip_and_are_optional(data_dir):
    f = _write(data_dir / "e.jsonl", [
        _good(id="e1", answer_type="CLOSED", modality="CT", body_part="Lung", meta={"phrase_type": "frame", "n": 3}),
        _good(id="e2"),  # a line written before these fields existed
    ])
    (e1, e2), rep = load_jsonl(f)
    assert rep.n_bad == 0
    assert (e1.answer_type, e1.modality, e1.body_part) == ("closed", "CT", "Lung")
    assert e1.meta == {"phrase_type": "frame", "n": "3"}
    assert (e2.answer_type, e2.modality, e2.body_part, e2.meta) == ("", "", "", {})
    j1, j2 = e1.to_json(), e2.to_json()
    assert j1["answer_type"] == "closed" and j1["meta"] == {"phrase_type": "frame", "n": "3"}
    assert not set(j2) & {"answer_type", "modality", "body_part", "meta"}  # unset: not written
    write_jsonl(data_dir / "copy.jsonl", [e1, e2])
    assert load_jsonl(data_dir / "copy.jsonl")[0] == [e1, e2]


@pytest.mark.parametrize("obj,field", [
    (_good(answer_type="yes/no"), "answer_type"),
    (_good(answer_type=1), "answer_type"),
    (_good(meta=["a"]), "meta"),
    (_good(meta={"k": {"nested": 1}}), "meta.k"),
    (_good(modality=["CT"]), "modality"),
])
def test_bad_evaluation_fields(data_dir, obj, field):
    f = _write(data_dir / "bad.jsonl", [obj])
    with pytest.raises(DataError) as e:
        load_jsonl(f)
    assert e.value.field == field


def _records(d):
    return [
        Record(id="s0", images=[str(d / "a.png")], question="Is there a lesion?", options=None, answer="yes",
               rois=[ROI(0, (10.0, 20.0, 110.0, 120.0))]),
        Record(id="s1", images=[str(d / "b.png"), str(d / "a.png")], question="Where is the lesion?",
               options=["upper left", "lower right"], answer="lower right",
               rois=[ROI(0, (30.0, 15.0, 150.0, 120.0)), ROI(1, (0.0, 0.0, 224.0, 224.0))]),
        Record(id="s2", images=[str(d / "a.png")], question="How large?", options=None, answer="small", rois=[]),
    ]


def test_collate_training_layout_labels_and_rois(default, data_dir):
    model, proc = default
    lt = latent_token_ids(proc)
    tok = proc.tokenizer
    recs = _records(data_dir)
    b = collate(recs, proc, k_latent=3, with_answer=True, latent_token_ids=lt)
    B, S = b.input_ids.shape
    P = b.latent_start
    assert B == 3 and 0 < P < S
    assert b.image_grid_thw.tolist() == [[1, 8, 8], [1, 4, 10], [1, 8, 8], [1, 8, 8]]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(b.mm_token_type_ids.bool(), b.input_ids == image_id)
    assert b.mm_token_type_ids.sum().item() == (16 + 10 + 16 + 16)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, r in enumerate(recs):
        m = b.attention_mask[i]
        lo, n = P - int(m[:P].sum()), P + int(m[P:].sum())  # the row's real tokens: columns [lo, n)
        assert m[lo:n].all() and not m[:lo].any() and not m[n:].any()  # prompt left-, answer right-padded
        s0 = P
        ids = b.input_ids[i].tolist()
        assert ids[s0 - 1] == lt.start and ids[s0:s0 + 3] == [lt.pad] * 3 and ids[s0 + 3] == lt.end
        ans = tok(r.answer, add_special_tokens=False)["input_ids"] + [im_end]
        assert ids[s0 + 4:n] == ans
        lab = b.labels[i]
        assert lab[s0 + 4:n].tolist() == ans
        assert (lab[:s0 + 4] == IGNORE_INDEX).all() and (lab[n:] == IGNORE_INDEX).all()
        assert tok.decode(ids[lo:s0 - 1]).startswith("<|im_start|>user\n<|vision_start|>")
    assert len({P - int(b.attention_mask[i, :P].sum()) for i in range(B)}) > 1  # ragged prompts
    # ROI boxes rescaled per axis to the resized image: a.png 224->112 (x0.5), b.png 300x150 -> 140x56.
    assert b.roi_sample.tolist() == [0, 1, 1] and b.roi_image.tolist() == [0, 1, 2]
    torch.testing.assert_close(b.roi_boxes, torch.tensor([
        [5.0, 10.0, 55.0, 60.0],
        [30 * 140 / 300, 15 * 56 / 150, 150 * 140 / 300, 120 * 56 / 150],
        [0.0, 0.0, 112.0, 112.0]]))
    assert b.resized_sizes.tolist() == [[112, 112], [140, 56], [112, 112], [112, 112]]
    # the ROI loss's geometry, checked once here (K = 3 latents -> bins 1 x 3)
    g = b.roi_geometry
    assert g.bins == (1, 3) and g.num_rois == 3 and g.tokens_per_image == (16, 10, 16, 16)
    assert torch.equal(g.boxes, b.roi_boxes) and b.to("cpu").roi_geometry is g
    with torch.no_grad():
        loss = model(**b.model_inputs(), labels=b.labels).loss
    assert torch.isfinite(loss)


def test_collate_generation_prompt_is_left_padded(default, data_dir):
    _, proc = default
    lt = latent_token_ids(proc)
    recs = _records(data_dir)
    b = collate(recs, proc, k_latent=4, with_answer=False, latent_token_ids=lt)
    assert b.roi_geometry is None  # generation prompts never reach the ROI loss
    S = b.input_ids.shape[1]
    assert (b.input_ids[:, -1] == lt.start).all()
    assert b.attention_mask[:, -1].all() and (b.attention_mask[:, 0] == 0).any()
    assert b.latent_start == S and (b.labels == IGNORE_INDEX).all()
    b0 = collate(recs, proc, k_latent=0, with_answer=False, latent_token_ids=lt)
    assert b0.latent_start == -1 and not (b0.input_ids == lt.start).any()
    assert proc.tokenizer.decode(b0.input_ids[0, -3:]) == "<|im_start|>assistant\n"
    t0 = collate(recs, proc, k_latent=0, with_answer=True, latent_token_ids=lt)
    assert not torch.isin(t0.input_ids, torch.tensor(list(lt))).any()


@pytest.mark.parametrize("k", [0, 4])
def test_training_batch_starts_with_the_prompt_batch(default, data_dir, k):
    # One layout: the training batch's first P columns are the prompt batch of the same records,
    # column for column (ids, mask, image token types), and its answer block starts in column P.
    _, proc = default
    lt = latent_token_ids(proc)
    recs = _records(data_dir)
    b = collate(recs, proc, k_latent=k, with_answer=False, latent_token_ids=lt)
    t = collate(recs, proc, k_latent=k, with_answer=True, latent_token_ids=lt)
    P = b.input_ids.shape[1]
    assert t.latent_start == b.latent_start == (P if k else -1)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(getattr(t, name)[:, :P], getattr(b, name)), name
    assert torch.equal(t.pixel_values, b.pixel_values) and torch.equal(t.image_grid_thw, b.image_grid_thw)
    assert t.attention_mask[:, P].all()  # every answer block starts in column P
    assert (t.labels[:, :P] == IGNORE_INDEX).all()


def test_a_batch_reaches_the_engine_only_through_model_inputs(default, data_dir):
    # One way to read a batch: medlvr/train reads a Batch by attribute; the engine and models/
    # take the mapping model_inputs() gives, and refuse the Batch itself.
    from collections.abc import Mapping

    from medlvr.engine.request import as_mapping

    _, proc = default
    b = collate(_records(data_dir), proc, k_latent=2, with_answer=False, latent_token_ids=latent_token_ids(proc))
    assert not isinstance(b, Mapping) and not hasattr(b, "keys") and not hasattr(b, "__getitem__")
    inputs = b.model_inputs()
    assert as_mapping(inputs) is inputs and set(inputs) == {"input_ids", "attention_mask", "pixel_values",
                                                             "image_grid_thw", "mm_token_type_ids"}
    with pytest.raises(TypeError, match="model_inputs"):
        as_mapping(b)


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_batch_from_model_inputs_equals_collate(default, data_dir, k):
    # Batch.prompts rebuilds the prompt batch a caller holding only the model inputs (a
    # processor's left-padded output) needs: the same latent column and empty answers and ROIs.
    from medlvr.policy import Batch

    _, proc = default
    b = collate(_records(data_dir), proc, k_latent=k, with_answer=False, latent_token_ids=latent_token_ids(proc))
    p = Batch.prompts(b.model_inputs(), k_latent=k)
    assert p.latent_start == b.latent_start and p.k_latent == b.k_latent == k
    assert all(torch.equal(v, b.model_inputs()[n]) for n, v in p.model_inputs().items())
    assert torch.equal(p.labels, b.labels) and p.roi_boxes.shape == (0, 4) and len(p) == len(b)
    with pytest.raises(ValueError, match="inputs: .*mm_token_type_ids"):
        Batch.prompts({"input_ids": b.input_ids, "attention_mask": b.attention_mask})


def test_collate_rejects_bad_arguments(default, data_dir):
    _, proc = default
    lt = latent_token_ids(proc)
    with pytest.raises(ValueError, match="records"):
        collate([], proc, k_latent=1, with_answer=True, latent_token_ids=lt)
    with pytest.raises(ValueError, match="k_latent"):
        collate(_records(data_dir), proc, k_latent=-1, with_answer=True, latent_token_ids=lt)


def _rec(answer, options=None):
    return Record(id="x", images=["i.png"], question="q", options=options, answer=answer)


@pytest.mark.parametrize("pred,record,ok", [
    ("yes", _rec("yes"), True),
    ("Yes.", _rec("yes"), True),
    ("yes, there is", _rec("yes"), True),
    ("no", _rec("yes"), False),
    ("", _rec("yes"), False),
    ("lower right", _rec("lower right", ["upper left", "lower right"]), True),
    ("B", _rec("lower right", ["upper left", "lower right"]), True),
    ("(b)", _rec("lower right", ["upper left", "lower right"]), True),
    ("B. lower right", _rec("lower right", ["upper left", "lower right"]), True),
    ("B. upper left", _rec("lower right", ["upper left", "lower right"]), False),
    ("A", _rec("lower right", ["upper left", "lower right"]), False),
    ("C", _rec("lower right", ["upper left", "lower right"]), False),
    ("The Liver.", _rec("liver"), True),
    ("liver disease", _rec("liver"), False),
])
def test_score(pred, record, ok):
    assert score(pred, record) is ok


def test_format_question_and_normalize():
    assert format_question("Where?", ["a x", "b y"]) == "Where?\nOptions:\nA. a x\nB. b y\nAnswer with the option's text."
    assert format_question(" Is it? ") == "Is it?"
    assert normalize_answer("The  LEFT lung.") == "left lung"
