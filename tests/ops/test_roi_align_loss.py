"""roi_align_loss: Triton against the reference, reference against torchvision / a
pixel-level definition, gradients, determinism, bad input.

Devices (tests/devices.py): Triton cases run on CPU tensors under the interpreter (marked
``interpreter``) and on CUDA tensors natively (marked ``cuda``); reference cases on CPU
and CUDA. The tolerances are the same on both: the kernels compute in fp32 with IEEE
products (no TF32 dot), and the interpreter rounds as the GPU does."""
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medlvr
from devices import backend_devices, kernel_devices, triton_devices
from medlvr.ops.roi_align_loss import roi_align_loss_memory_floor
from medlvr.reference.roi_align import clip_boxes, roi_align_loss_ref, roi_pool_targets_ref

from _roi_cases import BINS, BOX_IMAGE, BOXES, CELL, GRID, roi_loss  # noqa: E402


def n_tokens(grid):
    return int((grid[:, 0] * (grid[:, 1] // 2) * (grid[:, 2] // 2)).sum())


def inputs(D, dtype, grid=GRID, boxes=BOXES, bins=BINS, requires_grad=True, device="cpu", v_dtype=None):
    R, K = boxes.shape[0], bins[0] * bins[1]
    z = torch.randn(R, K, D).to(device, dtype).requires_grad_(requires_grad)
    v = torch.randn(n_tokens(grid), D).to(device, v_dtype or dtype).requires_grad_(requires_grad)
    return z, v


def run_both(z, v, grid, boxes, box_image, **kw):
    """(loss, dz, dv) from the Triton path and from autograd through the reference."""
    with medlvr.force_backend("triton"):
        out = roi_loss(z, v, grid, boxes, box_image, **kw)
    ref = roi_align_loss_ref(z, v, grid, boxes, box_image, **kw)
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
    g = torch.randn_like(ref)
    wrt = [x for x in (z, v) if x.requires_grad]
    got = torch.autograd.grad(out, wrt, g, allow_unused=True)
    want = torch.autograd.grad(ref, wrt, g, allow_unused=True)
    # with no boxes the reference's targets do not depend on v at all (grad None);
    # the op returns zeros
    want = tuple(torch.zeros_like(x) if w is None and a is not None else w for x, w, a in zip(wrt, want, got))
    return out, ref, got, want


# bf16/fp16: inputs are identical, only the accumulation order and the rounding of the
# stored gradient differ, so the loss keeps fp32 accuracy and gradients get one ulp of
# their dtype.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-5),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("detach_target", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["cosine", "mse"])
@pytest.mark.parametrize("pooling", ["area", "bilinear"])
def test_triton_matches_reference(pooling, loss, reduction, dtype, detach_target, device):
    # bins (1, 2) keeps the interpreter quick over 72 cases; taller bin grids are
    # covered by the random-box and D-slice tests
    z, v = inputs(40, dtype, bins=(1, 2), device=device)  # D = 40: not a multiple of the 64-wide block
    out, ref, got, want = run_both(z, v, GRID, BOXES, BOX_IMAGE, bins=(1, 2), pooling=pooling, loss=loss,
                                   reduction=reduction, detach_target=detach_target)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0].float(), want[0].float(), **TOL[dtype])
    if detach_target:
        assert got[1] is None and want[1] is None
    else:
        assert got[1].dtype == dtype
        torch.testing.assert_close(got[1].float(), want[1].float(), **TOL[dtype])
        # the image without boxes and tokens outside every box get exactly zero
        assert torch.count_nonzero(got[1][-4:]) == 0


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("pooling, sampling_ratio, D", [("area", 2, 520), ("bilinear", 2, 520),
                                                       ("bilinear", -1, 24), ("bilinear", 3, 24)])
def test_triton_d_slices_and_sampling_ratios(pooling, sampling_ratio, D, device):
    # D = 520 spans two 512-wide slices, the second nearly empty; bins 3 rows × 1 column
    z, v = inputs(D, torch.float32, bins=(3, 1), device=device)
    out, ref, got, want = run_both(z, v, GRID, BOXES, BOX_IMAGE, bins=(3, 1), pooling=pooling,
                                   sampling_ratio=sampling_ratio, detach_target=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@st.composite
def batches(draw):
    n_img = draw(st.integers(1, 3))
    grid = torch.tensor([[1, 2 * draw(st.integers(1, 7)), 2 * draw(st.integers(1, 9))] for _ in range(n_img)])
    n_box = draw(st.integers(0, 4))
    rows, img = [], []
    for _ in range(n_box):
        b = draw(st.integers(0, n_img - 1))
        w_px, h_px = int(grid[b, 2]) // 2 * CELL, int(grid[b, 1]) // 2 * CELL
        x0 = draw(st.floats(-30.0, w_px - 1.0))
        y0 = draw(st.floats(-30.0, h_px - 1.0))
        # at least 0.25 px inside the image after clipping; may run past the far edge
        x1 = max(x0, 0.0) + draw(st.floats(0.25, w_px + 30.0))
        y1 = max(y0, 0.0) + draw(st.floats(0.25, h_px + 30.0))
        rows.append([x0, y0, x1, y1])
        img.append(b)
    boxes = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    bins = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    return grid, boxes, torch.tensor(img, dtype=torch.long), bins


@pytest.mark.parametrize("device", triton_devices())
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=batches(), pooling=st.sampled_from(["area", "bilinear"]), loss=st.sampled_from(["cosine", "mse"]))
def test_triton_random_boxes(batch, pooling, loss, device):
    grid, boxes, box_image, bins = batch
    z, v = inputs(24, torch.float32, grid=grid, boxes=boxes, bins=bins, device=device)
    out, ref, got, want = run_both(z, v, grid, boxes, box_image, bins=bins, pooling=pooling, loss=loss,
                                   reduction="sum", detach_target=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=batches(), sampling_ratio=st.sampled_from([1, 2, 3, -1]))
def test_reference_bilinear_is_torchvision_roi_align(batch, sampling_ratio, device):
    grid, boxes, box_image, bins = batch
    v = torch.randn(n_tokens(grid), 3, dtype=torch.float64).to(device)
    got = roi_pool_targets_ref(v.float(), grid, boxes, box_image, bins=bins, pooling="bilinear",
                               sampling_ratio=sampling_ratio)
    hw = grid[:, 1:] // 2
    offsets = torch.cumsum(hw.prod(1), 0) - hw.prod(1)
    clipped = clip_boxes(boxes, hw[box_image], CELL) * CELL  # back to pixels, clipped
    for r in range(boxes.shape[0]):
        b = int(box_image[r])
        h, w = hw[b].tolist()
        fmap = v[offsets[b]: offsets[b] + h * w].float().view(h, w, -1).permute(2, 0, 1)[None]
        want = torchvision.ops.roi_align(fmap, [clipped[r: r + 1].to(device)], bins, spatial_scale=1 / CELL,
                                         sampling_ratio=sampling_ratio, aligned=True)
        torch.testing.assert_close(got[r], want[0].flatten(1).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_adaptive_sampling_matches_torchvision_on_whole_bin_extents(backend, device):
    # A box 3 tokens wide in 1 bin: torchvision evaluates 84 px * fp32(1/28) = 3.0000002 and
    # takes ceil = 4 samples, not 3 (found by hypothesis); the op must take the same count.
    grid = torch.tensor([[1, 2, 6], [1, 2, 2]])
    v = torch.randn(n_tokens(grid), 3)
    boxes = torch.tensor([[0.0, 0.0, 84.0, 1.0], [0.0, 0.0, 56.0, 28.0]])
    box_image = torch.tensor([0, 0])
    got = roi_pool_targets_ref(v, grid, boxes, box_image, bins=(1, 1), pooling="bilinear", sampling_ratio=-1)
    fmap = v[:3].view(1, 3, -1).permute(2, 0, 1)[None]
    want = torchvision.ops.roi_align(fmap, [boxes], (1, 1), spatial_scale=1 / CELL, sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(got, want.flatten(1)[:, None, :], rtol=1e-5, atol=1e-6)
    z = torch.randn(2, 1, 3)
    with medlvr.force_backend(backend):
        loss = roi_loss(z.to(device), v.to(device), grid, boxes, box_image, bins=(1, 1), pooling="bilinear",
                        loss="mse", reduction="none", sampling_ratio=-1)
    torch.testing.assert_close(loss.cpu(), ((z - want.flatten(1)[:, None, :]) ** 2).mean(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
def test_reference_area_is_mean_over_pixels(device):
    # with bin edges on whole pixels, the overlap-weighted mean of token cells is the
    # plain mean over the bin's pixels of the token map upsampled to pixels
    grid = torch.tensor([[1, 6, 10], [1, 4, 4]])
    v = torch.randn(n_tokens(grid), 4).to(device)
    boxes = torch.tensor([[6.0, 12.0, 126.0, 72.0], [2.0, 0.0, 56.0, 56.0], [27.0, 27.0, 30.0, 33.0]])
    box_image = torch.tensor([0, 1, 0])
    bins = (2, 3)
    got = roi_pool_targets_ref(v, grid, boxes, box_image, bins=bins, pooling="area")
    hw, off = [(3, 5), (2, 2)], [0, 15]
    for r, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        b = int(box_image[r])
        (h, w), o = hw[b], off[b]
        pix = v[o: o + h * w].view(h, w, -1).repeat_interleave(CELL, 0).repeat_interleave(CELL, 1)
        bh, bw = (y1 - y0) // bins[0], (x1 - x0) // bins[1]
        for p in range(bins[0]):
            for q in range(bins[1]):
                cell = pix[y0 + p * bh: y0 + (p + 1) * bh, x0 + q * bw: x0 + (q + 1) * bw]
                torch.testing.assert_close(got[r, p * bins[1] + q], cell.mean((0, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
def test_bins_are_row_major_over_the_box(device):
    grid = torch.tensor([[1, 8, 8]])  # 4×4 tokens; token (i, j) holds (i, j)
    ii, jj = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    v = torch.stack([ii.flatten(), jj.flatten()], 1).to(device)
    t = roi_pool_targets_ref(v, grid, torch.tensor([[0.0, 0.0, 112.0, 112.0]]), torch.tensor([0]),
                             bins=(2, 2), pooling="area")
    torch.testing.assert_close(t[0].cpu(), torch.tensor([[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]))


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_boxes_gives_zero_not_nan(backend, reduction, device):
    z, v = inputs(8, torch.float32, boxes=torch.zeros(0, 4), device=device)
    with medlvr.force_backend(backend):
        out = roi_loss(z, v, GRID, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), bins=BINS,
                       reduction=reduction, detach_target=False)
    assert out.shape == ((0, 6) if reduction == "none" else ())
    if reduction != "none":
        assert out.item() == 0.0
    dz, dv = torch.autograd.grad(out.sum(), (z, v))
    assert dz.shape == z.shape and torch.count_nonzero(dv) == 0


@pytest.mark.parametrize("device", triton_devices())
def test_forward_and_backward_are_deterministic(device):
    # the forward's total is summed by whichever program arrives last, in a fixed order
    z, v = inputs(24, torch.float32, device=device)
    runs = []
    for _ in range(2):
        with medlvr.force_backend("triton"):
            out = roi_loss(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, pooling="area", detach_target=False)
        runs.append((out.detach(), *torch.autograd.grad(out, (z, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_cpu_default_backend_is_the_reference():
    z, v = inputs(8, torch.float32, device="cpu")
    out = roi_loss(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, loss="mse")
    ref = roi_align_loss_ref(z, v, GRID, BOXES, BOX_IMAGE, bins=BINS, loss="mse")
    assert torch.equal(out, ref)


def test_memory_floor_counts_tokens_inside_boxes():
    v = torch.zeros(n_tokens(GRID), 16, dtype=torch.bfloat16)
    whole = roi_align_loss_memory_floor(v, GRID, torch.tensor([[0.0, 0.0, 140.0, 196.0]]), torch.tensor([0]),
                                        bins=BINS)
    assert whole["tokens_in_boxes"] == 35
    assert whole["forward"] == 6 * 16 * 2 + 35 * 16 * 2
    tiny = roi_align_loss_memory_floor(v, GRID, BOXES[:1], torch.tensor([0]), bins=BINS)
    assert tiny["tokens_in_boxes"] == 1  # inside token (1, 1): x 30–45.5, y 31–40 px
    grads = roi_align_loss_memory_floor(v, GRID, BOXES[:1], torch.tensor([0]), bins=BINS, detach_target=False)
    assert grads["backward"] - tiny["backward"] == v.numel() * 2


def _call(**over):
    z, v = inputs(8, torch.float32, requires_grad=False, device="cpu")
    args = dict(latents=z, vision_tokens=v, grid_thw=GRID, boxes=BOXES.clone(), box_image=BOX_IMAGE.clone(), bins=BINS)
    args.update(over)
    with medlvr.force_backend("triton"):
        return roi_loss(**args)


def _box(row, value):
    b = BOXES.clone()
    b[row] = torch.tensor(value)
    return b


@pytest.mark.parametrize("over, error, match", [
    (dict(boxes=_box(2, [50.0, 0.0, 40.0, 10.0])), ValueError, r"boxes row 2 .*x1 < x0"),
    (dict(boxes=_box(1, [150.0, 10.0, 170.0, 20.0])), ValueError, r"boxes row 1 .*empty after clipping"),
    (dict(boxes=_box(3, [10.0, 10.0, 10.0, 20.0])), ValueError, r"boxes row 3 .*empty after clipping"),
    (dict(boxes=_box(0, [0.0, 0.0, float("nan"), 1.0])), ValueError, r"boxes row 0 .*not finite"),
    (dict(box_image=torch.tensor([0, 3, 1, 0])), ValueError, r"box_image row 1 = 3 is out of range for 3 images"),
    (dict(box_image=torch.tensor([0, -1, 1, 0])), ValueError, r"box_image row 1 = -1"),
    (dict(grid_thw=torch.tensor([[1, 14, 10], [1, 6, 18], [1, 4, 6]])), ValueError, r"grid_thw adds up to 68"),
    (dict(grid_thw=torch.tensor([[2, 14, 10], [1, 6, 18], [1, 4, 4]])), ValueError, r"grid_thw row 0 .*t = 1"),
    (dict(grid_thw=torch.tensor([[1, 13, 10], [1, 6, 18], [1, 4, 4]])), ValueError, r"grid_thw row 0 .*multiples"),
    (dict(bins=(3, 3)), ValueError, r"K = 6 .*bins = \(3, 3\) needs K = 9"),
    (dict(bins=(2, 0)), ValueError, r"bins\[1\]"),
    (dict(pooling="max"), ValueError, r"pooling must be one of"),
    (dict(loss="l1"), ValueError, r"loss must be one of"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of"),
    (dict(sampling_ratio=0), ValueError, r"sampling_ratio must be a positive int or -1"),
    # fp64 is accepted (reference, in fp64); the forced fp32 Triton backend refuses it (fp64 rule)
    (dict(vision_tokens=torch.randn(66, 8, dtype=torch.float64)), TypeError,
     r"^roi_align_loss: vision_tokens has dtype float64"),
    (dict(vision_tokens=torch.randn(66, 8).int()), TypeError, r"vision_tokens must have dtype in"),
    (dict(vision_tokens=torch.randn(66, 9)), ValueError, r"vision_tokens must have D = 8"),
    (dict(latents=torch.randn(3, 6, 8)), ValueError, r"latents has R = 3 rows, but there are 4 boxes"),
    (dict(boxes=BOXES.long()), ValueError, r"boxes must be a floating tensor"),
    (dict(latents=torch.randn(4, 6, 8, dtype=torch.float64)), TypeError, r"^roi_align_loss: latents has dtype float64"),
    (dict(latents=torch.randn(4, 6, 8).long()), TypeError, r"latents must have dtype in"),
    (dict(boxes=BOXES[:, :3]), ValueError, r"boxes must be a floating tensor \(R, 4\) = \(4, 4\)"),
    (dict(boxes=BOXES[:3]), ValueError, r"box_image must be an integer tensor \(R,\) = \(3,\), one image per box"),
    (dict(box_image=BOX_IMAGE.float()), ValueError, r"box_image must be an integer tensor"),
])
def test_bad_input_names_the_problem(over, error, match):
    # every check runs on the host before any launch, so no device or interpreter is needed
    with pytest.raises(error, match=match):
        _call(**over)


_COMPILE_FOR_SM90 = r"""
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("roi_kernels", sys.argv[1])
k = importlib.util.module_from_spec(spec)
spec.loader.exec_module(k)
geom = {"geom_f_ptr": "*fp32", "geom_i_ptr": "*i32"}
fwd = dict(part_ptr="*fp32", count_ptr="*i32", sums_ptr="*fp32", loss_ptr="*fp32", total_ptr="*fp32", n_rows="i32",
           D="i32", K="i32", GW="i32", sampling_ratio="i32", scale="fp32", eps="fp32", **geom)
bwd = dict(sums_ptr="*fp32", g_ptr="*fp32", g_stride_r="i32", g_stride_k="i32", g_scale="fp32", dt_ptr="*fp32",
           D="i32", K="i32", GW="i32", sampling_ratio="i32", eps="fp32", **geom)
vision = dict(dt_ptr="*fp32", image_meta_ptr="*i32", rows_by_image_ptr="*i32", image_ptr_ptr="*i32",
              blocks_per_image="i32", D="i32", K="i32", GW="i32", sampling_ratio="i32", **geom)
tiles = dict(BLOCK_D=512, BLOCK_I=2, BLOCK_J=8)
# both poolings and losses, equal and mixed dtypes (fp32 latents with bf16 tokens: autocast)
cases = [
    (k._roi_loss_fwd_kernel, dict(z_ptr="*bf16", v_ptr="*bf16", **fwd),
     dict(**tiles, BLOCK_S=8, BLOCK_R=1024, AREA=False, COSINE=True)),
    (k._roi_loss_fwd_kernel, dict(z_ptr="*fp32", v_ptr="*bf16", **fwd),
     dict(**tiles, BLOCK_S=8, BLOCK_R=1024, AREA=True, COSINE=False)),
    (k._roi_loss_bwd_latent_kernel, dict(z_ptr="*bf16", v_ptr="*bf16", dz_ptr="*bf16", **bwd),
     dict(**tiles, AREA=True, COSINE=True, WRITE_DZ=True, WRITE_DT=True)),
    (k._roi_loss_bwd_latent_kernel, dict(z_ptr="*fp32", v_ptr="*bf16", dz_ptr="*fp32", **bwd),
     dict(**tiles, AREA=False, COSINE=False, WRITE_DZ=True, WRITE_DT=False)),
    (k._roi_loss_bwd_vision_kernel, dict(dv_ptr="*bf16", **vision),
     dict(BLOCK_T=16, BLOCK_D=256, BLOCK_K=16, AREA=False)),
    (k._roi_loss_bwd_vision_kernel, dict(dv_ptr="*fp32", **vision),
     dict(BLOCK_T=16, BLOCK_D=256, BLOCK_K=16, AREA=True)),
]
for fn, sig, consts in cases:
    names = fn.arg_names
    src = ASTSource(fn=fn, signature={n: sig.get(n, "constexpr") for n in names},
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"], fn.__name__
    print("compiled", fn.__name__)
"""


def test_kernels_compile_for_h100(tmp_path):
    # The interpreter runs kernels as numpy and forgives what the compiler rejects (types
    # of loop-carried values, scalar branches, tl.dot shapes): compile every kernel for
    # sm_90 down to a cubin, which needs ptxas (shipped with triton) but no GPU. In a
    # subprocess, because triton decides interpreter-or-compiler once per process.
    import importlib.util
    import os
    import subprocess
    import sys

    path = importlib.util.find_spec("medlvr.kernels.roi_align_loss").origin
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, path], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 6


@pytest.mark.cuda
@pytest.mark.parametrize("pooling", ["area", "bilinear"])
def test_cuda_issue_shape_bf16(pooling):
    # 16 images of 32×32 tokens, D = 3584, 4 boxes per image, K = 8
    torch.manual_seed(0)
    grid = torch.tensor([[1, 64, 64]] * 16)
    xy = torch.rand(64, 2) * 600
    wh = torch.rand(64, 2) * 300 + 10
    boxes = torch.cat([xy, xy + wh], 1)
    box_image = torch.arange(16).repeat_interleave(4)
    z = torch.randn(64, 8, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(16 * 1024, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kw = dict(bins=(2, 4), pooling=pooling, detach_target=False)
    out = roi_loss(z, v, grid, boxes, box_image, **kw)
    dz, dv = torch.autograd.grad(out, (z, v))
    ref = roi_align_loss_ref(z, v, grid, boxes, box_image, **kw)
    rz, rv = torch.autograd.grad(ref, (z, v))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dz.float(), rz.float(), **TOL[torch.bfloat16])
    torch.testing.assert_close(dv.float(), rv.float(), **TOL[torch.bfloat16])
