"""benchmarks/bench_roi_align_loss.py runs on every device present without a peer failing
(on CUDA: the bf16 case, where torchvision needs its fp32 fallback, and the CUDA graph
row), and its breakdown counts what the op's docs say. Speed is not asserted.

Devices (tests/devices.py): the speed table on CPU (where medlvr runs its reference: no
Triton) and CUDA; the breakdown on CPU tensors needs the interpreter (it counts and skips
the Triton launches there), on CUDA it profiles the native kernels."""
from pathlib import Path

import pytest

import _benchmarks
from devices import kernel_devices, triton_devices



@pytest.fixture(scope="module")
def bench():
    return _benchmarks.load("bench_roi_align_loss")


def _rows(folder: Path, stem: str) -> list[dict]:
    return _benchmarks.csv_rows(folder, f"{stem}-*.csv")


@pytest.mark.parametrize("device", kernel_devices())
def test_quick_benchmark_runs_every_provider(bench, tmp_path, device):
    bench.main(["--quick", "--device", device, "--iters", "2", "--warmup", "1", "--out", str(tmp_path)])
    rows = _rows(tmp_path, "roi_align_loss-quick")
    assert len(rows) == (7 if device == "cuda" else 6)
    for row in rows:
        assert not row["dtype"].startswith("could not run"), row
        assert float(row["fwd+bwd ms"]) > 0
    if device == "cuda":  # torchvision has no bf16 CUDA kernel: it runs fp32 and says so
        tv = next(r for r in rows if r["provider"].startswith("torchvision"))
        assert tv["dtype"].startswith("float32 (fp32 copies")


@pytest.mark.parametrize("device", triton_devices())
def test_breakdown_counts_launches_and_host_reads(bench, tmp_path, device):
    bench.main(["--breakdown", "--quick", "--device", device, "--iters", "2", "--warmup", "1", "--out", str(tmp_path)])
    rows = {r["call"]: r for r in _rows(tmp_path, "roi_align_loss-breakdown-quick")}
    geometry_fwd = rows["op, prepared geometry: forward"]
    if device == "cuda":
        assert float(geometry_fwd["kernels"]) == 1 and float(geometry_fwd["syncs"]) == 0
        assert float(geometry_fwd["memcpy/memset"]) == 0
    else:
        assert int(geometry_fwd["triton launches"]) == 1 and int(geometry_fwd["torch kernels"]) == 0
        assert int(geometry_fwd["host reads"]) == 0 and int(geometry_fwd["host-made tensors"]) == 0
        assert int(rows["op, prepared geometry: forward+backward"]["triton launches"]) == 2
        assert int(rows["op, boxes per call: forward"]["host reads"]) == 1  # the preparation's one read
