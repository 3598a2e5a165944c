"""Evaluation: the engine and the plain HF loop decode the same greedy answers, scoring and
grouping by benchmark / question type, and the written table, plot and predictions."""
import json

import pytest
import torch

from _threads import one_thread  # noqa: F401  (autouse fixture)
from medlvr.models import build_default, latent_token_ids
from medlvr.data.collate import collate
from medlvr.data.records import load_jsonl
from medlvr.eval.evaluate import _engine_generate, evaluate, hf_greedy, summarize
from medlvr.eval.outputs import print_table, write_outputs
from medlvr.policy import LatentLM
from medlvr.train.sft import Stage1Config
from medlvr.data.synth import synthesize


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
    b = collate(records, processor, k_latent=k, with_answer=False, latent_token_ids=ids)
    batch = b.model_inputs()
    assert int((batch["attention_mask"] == 0).sum()) > 0  # ragged prompts: left padding is exercised
    kw = dict(k=k, max_new_tokens=5, stop_id=stop, latent_end_id=ids.end, pad_id=tok.pad_token_id)
    ours = hf_greedy(model, batch, **kw)
    eng = _engine_generate(model, batch, projector=None, max_batch=len(records), **kw)
    assert eng is not None
    n = min(ours.shape[1], eng.shape[1])
    assert torch.equal(ours[:, :n], eng[:, :n])
    # One sample alone decodes the same tokens as inside the padded batch.
    one = collate(records[1:2], processor, k_latent=k, with_answer=False, latent_token_ids=ids)
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


# ------------------------------------------------- paired differences, latent ablation ---
def test_bootstrap_ci_hand_cases():
    from medlvr.eval.paired import bootstrap_ci

    assert bootstrap_ci([0.25] * 50) == (0.25, 0.25, 0.25)  # no spread: a point interval
    # 1000 paired differences in {-1, 0, +1}: the percentile interval is close to the normal
    # one, mean +- 1.96 sd / sqrt(n) (checked to 15% of its half-width)
    g = torch.Generator().manual_seed(0)
    d = (torch.randint(0, 3, (1000,), generator=g) - 1).double()
    d[:40] = 1.0
    mean, lo, hi = bootstrap_ci(d, n_boot=4000, seed=1)
    half = 1.96 * float(d.std()) / 1000 ** 0.5
    assert mean == pytest.approx(float(d.mean()))
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(d, n_boot=500, seed=3) == bootstrap_ci(d, n_boot=500, seed=3)  # seeded
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(d, n_boot=0)


def test_paired_differences_match_records_and_split_by_qtype():
    from medlvr.eval.paired import format_paired, paired_differences

    def preds(correct):
        return [dict(id=str(i), question="q", source="s", qtype="x" if i < 4 else "y", correct=c)
                for i, c in enumerate(correct)]

    a = summarize(preds([True, False, False, True, True, False]))
    b_rows = preds([True, True, True, True, False, False])
    b = summarize(list(reversed(b_rows)))  # order does not matter: matched by id
    d = paired_differences(a, b, n_boot=200)
    assert d["overall"][0] == pytest.approx(1 / 6) and d["overall"][3] == 6
    assert d["x"][0] == pytest.approx(0.5) and d["x"][3] == 4
    assert d["y"][0] == pytest.approx(-0.5) and d["y"][3] == 2
    assert d["overall"][1] <= d["overall"][0] <= d["overall"][2]
    text = format_paired({"b - a": d})
    assert "+16.7 [" in text and "overall" in text
    with pytest.raises(ValueError, match="same records"):
        paired_differences(a, summarize([dict(id="z", question="q", source="s", qtype="x", correct=True)]))


def test_latent_ablation_reports_every_intervention(setup):
    from medlvr.eval.ablation import format_ablation, latent_ablation

    model, processor, records = setup
    lm = LatentLM(model, Stage1Config(k_latent=2))
    res = latent_ablation(lm, processor, records, sigmas=(0.0, 1.0), batch_size=4, max_new_tokens=4)
    assert res["n"] == len(records) and res["k"] == 2
    assert set(res["ablations"]) == {"zero", "shuffle", "noise@0", "noise@1"}
    # replaying the clean latents (noise 0) changes nothing: the replay feeds exactly what the
    # clean loop fed
    same = res["ablations"]["noise@0"]
    assert same["shift_nats"] == pytest.approx(0.0, abs=1e-6) and same["changed"] == 0.0
    assert same["delta_accuracy"] == 0.0
    # zeroing the latents of a random model moves its first answer token's distribution
    assert res["ablations"]["zero"]["shift_nats"] > 1e-4
    assert all(a["shift_nats"] >= -1e-6 for a in res["ablations"].values())
    assert latent_ablation(LatentLM(model, Stage1Config(k_latent=0)), processor, records) is None
    text = format_ablation({"m": res, "sft": None})
    assert "shuffle" in text and "no latent segment" in text


def test_plot_labels_have_one_decimal(setup, tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    orig = matplotlib.axes.Axes.bar_label
    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label",
                        lambda self, bars, **kw: labels.extend(t.get_text() for t in orig(self, bars, **kw)))
    res = summarize([dict(id=str(i), source="s", qtype="x", correct=i % 3 == 0) for i in range(9)])
    write_outputs({"m": res}, tmp_path)
    assert labels and all(len(t.split(".")[-1]) == 1 for t in labels), labels
    assert "33.3" in labels


def test_eval_main_pairs_runs_and_ablates(tmp_path, capsys):
    """medlvr eval with two runs and --ablation: the paired table (second run minus the first)
    and the ablation of the run with latents, also in comparison.json."""
    from medlvr.cli import main

    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--n", "12", "--image-size", "56", "--split", "0.5", "0", "0.5"]) == 0
    for name, k in (("sft", "0"), ("lat", "2")):
        assert main(["sft", "--data", str(data / "train.jsonl"), "--out", str(tmp_path / name), "--k-latent", k,
                     "--steps", "1", "--batch-size", "3", "--no-progress", "--threads", "1"]) == 0
    ev = tmp_path / "eval"
    assert main(["eval", "--run", f"a={tmp_path / 'sft' / 'final'}", "--run", f"b={tmp_path / 'lat' / 'final'}",
                 "--data", str(data / "test.jsonl"), "--out", str(ev), "--max-new-tokens", "3", "--threads", "1",
                 "--ablation", "--bootstrap", "200", "--ablation-sigma", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "b - a" in out and "shuffle" in out and "no latent segment" in out
    comp = json.loads((ev / "comparison.json").read_text())
    assert set(comp["paired"]["b - a"]) >= {"overall"} and comp["paired"]["b - a"]["overall"][3] == 6
    assert comp["ablation"]["a"] is None and set(comp["ablation"]["b"]["ablations"]) == {"zero", "shuffle",
                                                                                          "noise@0.5"}


def _count_engines(monkeypatch) -> list:
    import medlvr.engine.holder

    built = []

    class Counted(medlvr.engine.holder.LatentEngine):
        def __init__(self, *a, **kw):
            built.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(medlvr.engine.holder, "LatentEngine", Counted)
    return built


def test_evaluate_builds_one_engine_for_all_batches(setup, monkeypatch):
    model, processor, records = setup
    built = _count_engines(monkeypatch)
    res = evaluate(model, processor, records, k=2, batch_size=2, max_new_tokens=3, backend="engine", progress=False)
    assert res.n == len(records) > 2 and len(built) == 1


def test_evaluate_chooses_hf_from_the_model_type(setup, monkeypatch):
    # A model type the engine has no adapter for: "auto" takes the HF loop without trying an
    # engine, "engine" is refused naming the supported types.
    model, processor, records = setup
    hf_res = evaluate(model, processor, records, k=2, batch_size=3, max_new_tokens=3, backend="hf", progress=False)
    built = _count_engines(monkeypatch)
    monkeypatch.setattr(model.config, "model_type", "not_an_engine_model")
    auto = evaluate(model, processor, records, k=2, batch_size=3, max_new_tokens=3, backend="auto", progress=False)
    assert not built and auto.predictions == hf_res.predictions
    with pytest.raises(ValueError, match="model_type must be one of"):
        evaluate(model, processor, records, k=2, batch_size=3, max_new_tokens=3, backend="engine", progress=False)
