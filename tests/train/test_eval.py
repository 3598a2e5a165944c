"""Evaluation: the engine and the plain HF loop decode the same greedy answers, scoring and
grouping by benchmark / question type, and the written table, plot and predictions."""
import json

import pytest
import torch

from _threads import one_thread  # noqa: F401  (autouse fixture)
from medlvr.models import build_default, latent_token_ids
from medlvr.train.collate import collate
from medlvr.train.data import load_jsonl
from medlvr.train.evaluate import (_engine_generate, evaluate, hf_greedy, print_table, summarize,
                                   write_outputs)
from medlvr.train.stage1 import LatentLM, Stage1Config
from medlvr.train.synth import synthesize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    paths = synthesize(d, n=6, seed=1, image_size=56, split_fractions=(0.0, 0.0, 1.0))
    model, processor = build_default(seed=0)
    return model.eval(), processor, load_jsonl(paths["test"])[0]


@pytest.mark.parametrize("k", [0, 3])
def test_engine_and_hf_loop_agree(setup, k):
    model, processor, records = setup
    ids = latent_token_ids(processor)
    tok = processor.tokenizer
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    b = collate(records, processor, k_latent=k, with_answer=False, latent_token_ids=ids, padding_side="left")
    batch = b.model_inputs()
    assert int((batch["attention_mask"] == 0).sum()) > 0  # ragged prompts: left padding is exercised
    kw = dict(k=k, max_new_tokens=5, stop_id=stop, latent_end_id=ids.end, pad_id=tok.pad_token_id)
    ours = hf_greedy(model, batch, **kw)
    eng = _engine_generate(model, batch, projector=None, max_batch=len(records), **kw)
    assert eng is not None
    n = min(ours.shape[1], eng.shape[1])
    assert torch.equal(ours[:, :n], eng[:, :n])
    # One sample alone decodes the same tokens as inside the padded batch.
    one = collate(records[1:2], processor, k_latent=k, with_answer=False, latent_token_ids=ids, padding_side="left")
    assert torch.equal(hf_greedy(model, one.model_inputs(), **kw)[0], ours[1])


def test_evaluate_groups_and_outputs(setup, tmp_path):
    model, processor, records = setup
    lm = LatentLM(model, Stage1Config(k_latent=2))
    res = evaluate(lm, processor, records, batch_size=4, max_new_tokens=4, backend="hf", progress=False)
    assert res.n == len(records) == len(res.predictions)
    assert set(res.by_qtype) == {r.qtype for r in records} and set(res.by_source) == {"synth"}
    res2 = evaluate(lm, processor, records, batch_size=4, max_new_tokens=4, backend="engine", progress=False)
    assert [p["prediction"] for p in res.predictions] == [p["prediction"] for p in res2.predictions]
    text = print_table({"m1": res, "m2": res2})
    assert "overall" in text and "[synth]" in text
    files = write_outputs({"m1": res, "m2": res2}, tmp_path)
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in files["predictions"].read_text().splitlines()]
    assert len(rows) == 2 * len(records) and {"model", "prediction", "correct", "qtype"} <= set(rows[0])
    assert json.loads(files["accuracy"].read_text())["m1"]["n"] == len(records)


def test_summarize_counts():
    preds = [dict(source="a", qtype="x", correct=True), dict(source="a", qtype="y", correct=False),
             dict(source="b", qtype="x", correct=True), dict(source="b", qtype="x", correct=False)]
    r = summarize(preds)
    assert r.overall == 0.5 and r.n == 4
    assert r.by_source == {"a": (0.5, 2), "b": (0.5, 2)}
    assert r.by_qtype == {"x": (2 / 3, 3), "y": (0.0, 1)}
    assert r.by_source_qtype["b"] == {"x": (0.5, 2)}


def test_bad_backend(setup):
    model, processor, records = setup
    with pytest.raises(ValueError, match="backend"):
        evaluate(model, processor, records, backend="vllm")
