"""benchmarks/bench_fused_logprobs.py runs every provider on each device present without a peer
crashing it, and its agreement check (d hidden of each medlvr row against the unfused spec, in
fp64) passes for the real rows and flags a wrong one. Speed is not asserted."""
from pathlib import Path

import pytest

import _benchmarks
from devices import kernel_devices
from medlvr import _backend

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="medlvr._C was not built")
TINY = ["--quick", "--no-compile", "--n", "16", "--d", "32", "--v", "1000", "--iters", "1", "--warmup", "0"]
MEDLVR_ROWS = {"medlvr unfused", "medlvr fused", "medlvr fused CE", "medlvr fused VLPO", "medlvr fused VLPO on-policy"}


@pytest.fixture(scope="module")
def bench():
    return _benchmarks.load("bench_fused_logprobs")


def _rows(folder: Path) -> dict:
    return {r["provider"]: r for r in _benchmarks.csv_rows(folder, "fused_logprobs-quick-*.csv")}


@pytest.mark.parametrize("device", kernel_devices())
def test_quick_benchmark_runs_and_medlvr_rows_agree(bench, tmp_path, device):
    bench.main(TINY + ["--device", device, "--out", str(tmp_path), "--chunk-sizes", "5"])
    rows = _rows(tmp_path)
    # one row each, the bare GEMMs and the chunk-size row
    assert len(rows) == len(bench.PROVIDERS) + 2 and MEDLVR_ROWS | {"bare GEMMs", "medlvr fused CE C=5"} <= set(rows)
    assert rows["medlvr fused CE C=5"]["status"] == "ok" and float(rows["medlvr fused CE C=5"]["fwd_bwd_ms"]) > 0
    tol = 1e-4 if device == "cpu" else 5e-2  # CUDA runs bf16
    for name in MEDLVR_ROWS:
        assert rows[name]["status"] == "ok", rows[name]
        assert float(rows[name]["dh_err"]) <= tol and float(rows[name]["fwd_bwd_ms"]) > 0
    assert rows["compiled"]["status"] == "not runnable: --no-compile"
    if device == "cpu":
        assert rows["Liger FLCE"]["status"].startswith("not runnable: liger-kernel needs CUDA")


def test_agreement_check_flags_a_wrong_gradient(bench, tmp_path, monkeypatch):
    """The objective with the wrong sign (the CE's loss not negated) must be reported, not hidden."""
    right = bench.PROVIDERS["medlvr fused CE"]
    monkeypatch.setitem(bench.PROVIDERS, "medlvr fused CE", lambda ctx: (lambda h, W, f=right(ctx): -f(h, W)))
    bench.main(TINY + ["--device", "cpu", "--providers", "naive,medlvr fused CE", "--out", str(tmp_path)])
    row = _rows(tmp_path)["medlvr fused CE"]
    assert float(row["dh_err"]) == pytest.approx(2.0, rel=1e-4)
    assert "differs from its spec" in row["status"]
