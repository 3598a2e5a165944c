"""roi_align_loss with a geometry prepared once per batch: one geometry serves every pooling
and repeated calls (checked against the reference, medlvr/reference/roi_align.py), no host
read or host-made tensor in the call (and on a GPU: no sync, CUDA graph capture), mixed
float dtypes and bf16 autocast, the stage-1 hand-off, bad input.

Devices (tests/devices.py): Triton cases on CPU tensors under the interpreter and on CUDA
tensors natively, reference cases on CPU and CUDA, with the same tolerances."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import medlvr
from devices import backend_devices, kernel_devices, triton_devices
from medlvr.engine.graphs import capture_graph
from medlvr.ops.roi_align_loss import RoiGeometry, prepare_roi_geometry, roi_align_loss
from medlvr.reference.roi_align import roi_align_loss_ref

from _roi_cases import BINS, BOX_IMAGE, BOXES, GRID, T, roi_loss  # noqa: E402


def _zv(D=16, z_dtype=torch.float32, v_dtype=torch.float32, device="cpu"):
    z = torch.randn(4, 6, D).to(device, z_dtype).requires_grad_(True)
    v = torch.randn(T, D).to(device, v_dtype).requires_grad_(True)
    return z, v


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("pooling, sampling_ratio", [("area", 2), ("bilinear", 2), ("bilinear", -1)])
def test_one_geometry_serves_every_pooling_and_call(pooling, sampling_ratio, device):
    # prepared once (pooling-free), used for several calls: each equals the reference on the
    # raw boxes, and the calls are bit-equal to each other
    geometry = prepare_roi_geometry(GRID.to(device), BOXES.to(device), BOX_IMAGE.to(device), bins=BINS)
    z, v = _zv(device=device)
    kw = dict(pooling=pooling, sampling_ratio=sampling_ratio, reduction="none", detach_target=False)
    g = torch.randn(4, 6, device=device)
    ref = roi_align_loss_ref(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, **kw)
    ref_grads = torch.autograd.grad(ref, (z, v), g)
    with medlvr.force_backend("triton"):
        first = roi_align_loss(z, v, geometry=geometry, **kw)
        first_grads = torch.autograd.grad(first, (z, v), g)
        torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(first_grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        new = roi_align_loss(z, v, geometry=geometry, **kw)
        assert torch.equal(new, first)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(new, (z, v), g), first_grads))
    # the forward's arrival counters are back at zero for the next call / graph replay
    assert torch.count_nonzero(geometry.tables["counters"]) == 0


class _HostTraffic(TorchFunctionMode):
    """Records every torch call that reads a tensor's data on the host or makes a tensor
    from host data: on a GPU each would be a device sync or a host-to-device copy."""
    NAMES = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu", "cuda", "to",
             "nonzero", "tensor", "as_tensor", "from_numpy", "pin_memory", "copy_"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("backward", [False, True])
def test_call_with_geometry_reads_nothing_from_the_device(backward, device):
    geometry = prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=BINS).to(device)
    z, v = _zv(device=device)
    with medlvr.force_backend("triton"):
        with _HostTraffic() as seen:
            out = roi_align_loss(z, v, geometry=geometry, pooling="bilinear", detach_target=False)
            if backward:
                out.backward()
        assert seen.seen == []
        # the detector is not blind: preparing the geometry reads the boxes' verdict on the host
        with _HostTraffic() as seen:
            prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=BINS)
        assert "tolist" in seen.seen


@pytest.mark.cuda
def test_cuda_no_sync_and_graph_capture_of_forward_and_backward():
    geometry = prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=BINS).to("cuda")
    z = torch.randn(4, 6, 64, device="cuda", requires_grad=True)
    v = torch.randn(T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = roi_align_loss(z, v, geometry=geometry, pooling="area", detach_target=False)
        dz, dv = torch.autograd.grad(out, (z, v))
        return out, dz, dv

    eager = step()  # also compiles the kernels before the capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph, captured = capture_graph(step)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, eager))


@pytest.mark.parametrize("z_dtype, v_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("backend, device", backend_devices())
def test_mixed_float_dtypes(backend, z_dtype, v_dtype, device):
    # contract: any two of fp32/fp16/bf16; computed in fp32 from the inputs as given, loss
    # fp32, each gradient in its input's dtype (one ulp of it against the fp32 reference)
    z, v = _zv(z_dtype=z_dtype, v_dtype=v_dtype, device=device)
    with medlvr.force_backend(backend):
        out = roi_loss(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, detach_target=False)
    zr, vr = z.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    ref = roi_align_loss_ref(zr, vr, GRID, BOXES, BOX_IMAGE, bins=BINS, detach_target=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out, (z, v))
    want = torch.autograd.grad(ref, (zr, vr))
    for g, w, x in zip(got, want, (z, v)):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.float(), w, rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_under_bf16_autocast(backend, device):
    # under autocast the vision tokens arrive bf16 while the latents stay fp32.
    # The loss is the fp32 loss of those inputs (autocast must not lower the pooling).
    z, v = _zv(z_dtype=torch.float32, v_dtype=torch.bfloat16, device=device)
    with medlvr.force_backend(backend), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = roi_loss(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, pooling="bilinear", detach_target=False)
    with medlvr.force_backend(backend):
        plain = roi_loss(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, pooling="bilinear", detach_target=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-7)
    dz, dv = torch.autograd.grad(out, (z, v))
    assert dz.dtype == torch.float32 and dv.dtype == torch.bfloat16


@pytest.mark.parametrize("device", kernel_devices())
def test_stage1_alignment_term_with_the_collated_geometry(device):
    # medlvr.train.sft.roi.roi_alignment takes the batch's geometry (made by collate): per sample,
    # the mean over its boxes of the reference loss on the raw boxes (on CPU tensors the
    # reference path, on CUDA the kernels: what stage 1 runs there); a batch with boxes but
    # no geometry is refused
    from medlvr.train.sft.roi import roi_alignment

    sample = torch.tensor([0, 2, 2, 1])
    h = torch.randn(3, 6, 16).to(device).requires_grad_(True)
    v = torch.randn(T, 16).to(device).requires_grad_(True)
    got = roi_alignment(h, v, sample, prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=(2, 3)))
    rows = roi_align_loss_ref(h[sample.to(device)], v, GRID, BOXES, BOX_IMAGE, bins=(2, 3), reduction="none").mean(1)
    want = torch.stack([rows[0], rows[3], rows[1:3].mean()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), h)[0], torch.autograd.grad(want.sum(), h)[0],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="roi_geometry"):
        roi_alignment(h, v, sample, None)


class _Calls(TorchFunctionMode):
    """Names of the torch functions called inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", kernel_devices())
def test_stage1_per_sample_sum_is_deterministic_and_equals_index_add(device):
    # index_add of floats on CUDA accumulates with atomics in a varying order. roi_alignment's
    # per-sample mean must equal the index_add sum (rows in any order, several per sample, a
    # sample with none) without any accumulate-by-index op; the CPU cannot show atomics, so
    # it checks that none is used.
    from medlvr.train.sft.roi import roi_alignment

    sample = torch.tensor([3, 0, 3, 3])  # unsorted; samples 1 and 2 have no box
    geometry = prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=BINS)
    h = torch.randn(4, 6, 16).to(device).requires_grad_(True)
    v = torch.randn(T, 16).to(device)
    with _Calls() as calls:
        got = roi_alignment(h, v, sample, geometry)
    assert not calls.names & {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put_", "put_"}
    g = torch.linspace(1, 2, 4, device=device)
    dh = torch.autograd.grad(got, h, g)[0]

    h0 = h.detach().clone().requires_grad_(True)
    per_row = roi_align_loss(h0[sample.to(device)], v, geometry=geometry.to(device), reduction="none")
    per_row = per_row.mean(1)
    s = sample.to(device)
    counts = torch.zeros(4, device=device).index_add_(0, s, torch.ones_like(per_row))
    old = torch.zeros(4, device=device).index_add(0, s, per_row) / counts.clamp(min=1)
    torch.testing.assert_close(got, old, rtol=1e-6, atol=1e-7)
    assert got[1] == 0 and got[2] == 0
    torch.testing.assert_close(dh, torch.autograd.grad(old, h0, g)[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(roi_alignment(h, v, sample, geometry), got.detach())  # run to run: bit-equal


def test_geometry_moves_once_and_is_pooling_free():
    geometry = prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=BINS)
    assert isinstance(geometry, RoiGeometry) and geometry.device.type == "cpu"
    assert geometry.to("cpu") is geometry
    assert geometry.num_rois == 4 and geometry.n_tokens == T and geometry.tokens_per_image == (35, 27, 4)
    # every table is a view of the one buffer (a single copy moves them all)
    assert all(t.untyped_storage().data_ptr() == geometry.buffer.untyped_storage().data_ptr()
               for t in geometry.tables.values())
    x0, y0, bin_w, bin_h = geometry.tables["geom_f"].view(4, 4)[0].tolist()
    assert (x0, y0) == pytest.approx((30 / 28, 31 / 28)) and bin_w == pytest.approx(15.5 / 28 / 3)


@pytest.mark.parametrize("device", triton_devices())
def test_geometry_prepared_empty_batch(device):
    geometry = prepare_roi_geometry(GRID, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), bins=BINS)
    z, v = torch.zeros(0, 6, 8, device=device, requires_grad=True), torch.randn(T, 8, device=device)
    with medlvr.force_backend("triton"):
        out = roi_align_loss(z, v, geometry=geometry.to(device))
    assert out.item() == 0.0


def _row(r, value):
    b = BOXES.clone()
    b[r] = torch.tensor(value)
    return b


@pytest.mark.parametrize("call, error, match", [
    (lambda z, v, g: roi_align_loss(z, v), TypeError, r"needs geometry=prepare_roi_geometry"),
    (lambda z, v, g: roi_align_loss(z, v, GRID, geometry=g), TypeError, r"positional argument"),
    (lambda z, v, g: roi_align_loss(z, v, geometry=BOXES), TypeError, r"geometry must be a RoiGeometry"),
    (lambda z, v, g: roi_align_loss(z, v, geometry=g, bins=(3, 2)), ValueError, r"bins = \(3, 2\) differs"),
    (lambda z, v, g: roi_align_loss(z, v, geometry=g, merge=1), ValueError, r"merge = 1 differs"),
    (lambda z, v, g: roi_align_loss(z[:3], v, geometry=g), ValueError, r"R = 3 rows, but there are 4 boxes"),
    (lambda z, v, g: roi_align_loss(z, v[:60], geometry=g), ValueError, r"adds up to 66 .*T = 60"),
    (lambda z, v, g: prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=(2,)), TypeError, r"bins must be a pair"),
    (lambda z, v, g: prepare_roi_geometry(GRID, _row(2, [0.0, 0.0, float("inf"), 1.0]), BOX_IMAGE, bins=BINS),
     ValueError, r"boxes row 2 .*not finite"),
    (lambda z, v, g: prepare_roi_geometry(GRID, _row(1, [0.0, 50.0, 10.0, 40.0]), BOX_IMAGE, bins=BINS),
     ValueError, r"boxes row 1 .*x1 < x0 or y1 < y0"),
    (lambda z, v, g: prepare_roi_geometry(GRID, _row(3, [300.0, 0.0, 400.0, 10.0]), BOX_IMAGE, bins=BINS),
     ValueError, r"boxes row 3 .*empty after clipping to image 0 \(140 x 196 px\)"),
])
def test_bad_geometry_use_names_the_problem(call, error, match):
    z, v = _zv(D=8, device="cpu")
    geometry = prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=BINS)
    with pytest.raises(error, match=match):
        call(z, v, geometry)


@pytest.mark.cuda
def test_cuda_geometry_on_the_wrong_device_is_an_error():
    geometry = prepare_roi_geometry(GRID, BOXES, BOX_IMAGE, bins=BINS)  # on the CPU
    z, v = _zv(device="cuda")
    with pytest.raises(ValueError, match=r"geometry is on cpu.*geometry.to\(device\)"):
        roi_align_loss(z, v, geometry=geometry)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_in_place_on_the_loss_keeps_the_backward(reduction, device):
    # the returned loss is no view of the Function's buffers: scaling it in place is fine
    z, v = _zv(device=device)
    with medlvr.force_backend("triton"):
        out = roi_loss(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, reduction=reduction)
        want = torch.autograd.grad(out.sum() * 3.0, z)[0]
        out = roi_loss(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, reduction=reduction)
        out.mul_(3.0)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), z)[0], want, rtol=0, atol=0)
