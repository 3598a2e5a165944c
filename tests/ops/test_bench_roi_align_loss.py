"""benchmarks/bench_roi_align_loss.py runs on this machine's device without a peer failing
(on a GPU: the bf16 CUDA case, where torchvision needs its fp32 fallback, and the CUDA
graph row), and its breakdown counts what the op's docs say. Speed is not asserted."""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_roi_align_loss.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_roi_align_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(folder: Path, stem: str) -> list[dict]:
    (path,) = folder.glob(f"{stem}-*.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_benchmark_runs_every_provider(bench, tmp_path):
    bench.main(["--quick", "--iters", "2", "--warmup", "1", "--out", str(tmp_path)])
    rows = _rows(tmp_path, "roi_align_loss-quick")
    assert len(rows) == (7 if torch.cuda.is_available() else 6)
    for row in rows:
        assert not row["dtype"].startswith("could not run"), row
        assert float(row["fwd+bwd ms"]) > 0
    if torch.cuda.is_available():  # torchvision has no bf16 CUDA kernel: it runs fp32 and says so
        tv = next(r for r in rows if r["provider"].startswith("torchvision"))
        assert tv["dtype"].startswith("float32 (fp32 copies")


def test_breakdown_counts_launches_and_host_reads(bench, tmp_path):
    bench.main(["--breakdown", "--quick", "--iters", "2", "--warmup", "1", "--out", str(tmp_path)])
    rows = {r["call"]: r for r in _rows(tmp_path, "roi_align_loss-breakdown-quick")}
    geometry_fwd = rows["op, prepared geometry: forward"]
    if torch.cuda.is_available():
        assert float(geometry_fwd["kernels"]) == 1 and float(geometry_fwd["syncs"]) == 0
        assert float(geometry_fwd["memcpy/memset"]) == 0
    else:
        assert int(geometry_fwd["triton launches"]) == 1 and int(geometry_fwd["torch kernels"]) == 0
        assert int(geometry_fwd["host reads"]) == 0 and int(geometry_fwd["host-made tensors"]) == 0
        assert int(rows["op, prepared geometry: forward+backward"]["triton launches"]) == 2
        assert int(rows["op, boxes per call: forward"]["host reads"]) == 1  # the preparation's one read
