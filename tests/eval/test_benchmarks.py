"""The paper's table: per-benchmark accuracy over counted records, the macro average, closed /
open and modality groups, and the stratified paired bootstrap of the average's difference."""
import math

import pytest

from medlvr.eval.benchmarks import benchmark_table, macro_paired_difference, markdown, write_benchmark_table
from medlvr.eval.evaluate import summarize


def _result(correct, *, answer_types=None, modalities=None, counted=None):
    preds = [{"id": f"r{i}", "question": "q", "source": "b", "qtype": "t", "correct": c,
              "answer_type": (answer_types or ["closed"] * len(correct))[i],
              "modality": (modalities or ["unknown"] * len(correct))[i],
              "counted": True if counted is None else counted[i]} for i, c in enumerate(correct)]
    r = summarize(preds)
    r.settings = {"protocol": "medevalkit", "prompt": {"max_pixels": 1003520}, "decoding": {"strategy": "greedy"}}
    return r


def test_the_average_weighs_each_benchmark_the_same_and_its_interval_is_stratified():
    # bench "small": 2 records, the other run gains both; bench "big": 100 records, no change.
    point, lo, hi, n = macro_paired_difference({"small": ([0, 0], [1, 1]), "big": ([1] * 100, [1] * 100)})
    assert (point, lo, hi, n) == (0.5, 0.5, 0.5, 102)  # every resample: (1 + 0) / 2; pooled would say 2/102
    with pytest.raises(ValueError, match="pairs"):
        macro_paired_difference({})


def test_table_groups_counts_and_pairs():
    a = {"slake": _result([1, 0, 1, 0], answer_types=["closed", "closed", "open", "open"]),
         "omni": _result([1, 1, 0, 0], modalities=["CT", "CT", "MRI", "MRI"], counted=[True, True, True, False])}
    b = {"slake": _result([1, 1, 1, 1], answer_types=["closed", "closed", "open", "open"]),
         "omni": _result([1, 1, 1, 0], modalities=["CT", "CT", "MRI", "MRI"], counted=[True, True, True, False])}
    t = benchmark_table({"base": a, "new": b}, n_boot=200)
    assert t.accuracy["base"]["omni"] == (2 / 3, 3)  # the uncounted record is out of the denominator
    assert math.isclose(t.average["base"], (0.5 + 2 / 3) / 2)
    assert t.split["base"]["slake"] == {"closed": (0.5, 2), "open": (0.5, 2)}
    assert t.modality["new"]["omni"] == {"CT": (1.0, 2), "MRI": (1.0, 1)} and "slake" not in t.modality["new"]
    diff = t.paired["new"]
    assert math.isclose(diff["slake"][0], 0.5) and math.isclose(diff["omni"][0], 1 / 3)
    assert math.isclose(diff["average"][0], (0.5 + 1 / 3) / 2)
    md = markdown(t)
    assert "| base | 50.0 | 66.7 | 58.3 |" in md and "omni by modality" in md


def test_written_files(tmp_path):
    t = benchmark_table({"a": {"x": _result([1, 0])}, "b": {"x": _result([1, 1])}}, n_boot=50)
    files = write_benchmark_table(t, tmp_path)
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "protocol `medevalkit`" in files["markdown"].read_text() and "1003520" in files["markdown"].read_text()
    assert files["csv"].read_text().splitlines()[0] == "run,benchmark,group,accuracy,n"
