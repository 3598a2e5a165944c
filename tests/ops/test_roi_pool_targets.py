"""medlvr.ops.roi_pool_targets (the materialised pooled ROI targets, stage 1's teacher-forced
latent inputs) against medlvr.reference.roi_align.roi_pool_targets_ref: bit-identical on CPU
(weights trained through it must not change), fp32 also under autocast, differentiable, and
bad input rejected before any work with an error naming the argument."""
from __future__ import annotations

import pytest
import torch

from _roi_cases import BOX_IMAGE, BOXES, GRID, T
from medlvr import force_backend
from medlvr.ops import roi_pool_targets
from medlvr.reference.roi_align import roi_pool_targets_ref

D = 8


def _random_boxes(seed: int, n: int, grid: torch.Tensor, cell: int = 28):
    """n boxes inside (or partly outside) random images of ``grid``, none empty after clipping."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, grid.shape[0], (n,), generator=g)
    wh = (grid[img][:, [2, 1]] // 2 * cell).float()  # image (w, h) in pixels
    lo = torch.rand(n, 2, generator=g) * wh * 0.8 - 5.0
    size = torch.rand(n, 2, generator=g) * wh * 0.6 + 8.0  # hi >= 3 px: inside after clipping
    return torch.cat([lo, lo + size], 1), img


@pytest.mark.parametrize("pooling, sampling_ratio", [("area", 2), ("bilinear", 2), ("bilinear", -1)])
@pytest.mark.parametrize("bins", [(2, 3), (1, 1), (3, 2), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bit_identical_to_reference(pooling, sampling_ratio, bins, dtype):
    v = torch.randn(T, D).to(dtype)
    for boxes, box_image in [(BOXES, BOX_IMAGE), _random_boxes(0, 7, GRID), _random_boxes(1, 3, GRID)]:
        got = roi_pool_targets(v, GRID, boxes, box_image, bins=bins, pooling=pooling, sampling_ratio=sampling_ratio)
        want = roi_pool_targets_ref(v, GRID, boxes, box_image, bins=bins, pooling=pooling,
                                    sampling_ratio=sampling_ratio)
        assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.shape == (boxes.shape[0], bins[0] * bins[1], D)
        assert torch.equal(got, want)


def test_the_stage1_teacher_call():
    """The call medlvr/train/sft/roi.py makes: detached tokens, float boxes, long image ids,
    area pooling, an explicit merge."""
    v = torch.randn(T, D)
    rows = torch.tensor([0, 2, 3])
    got = roi_pool_targets(v.detach(), GRID, BOXES[rows].float(), BOX_IMAGE[rows].long(), bins=(2, 2),
                           pooling="area", merge=2)
    want = roi_pool_targets_ref(v.detach(), GRID, BOXES[rows].float(), BOX_IMAGE[rows].long(), bins=(2, 2),
                                pooling="area", merge=2)
    assert torch.equal(got, want)


def test_other_merge_and_patch():
    grid = torch.tensor([[1, 12, 9], [1, 6, 6]])  # merge 3: 4x3 + 2x2 tokens, cell 3 * 16 = 48 px
    v = torch.randn(16, D)
    boxes = torch.tensor([[10.0, 5.0, 140.0, 180.0], [0.0, 0.0, 96.0, 50.0]])
    kw = dict(bins=(2, 2), merge=3, patch=16)
    got = roi_pool_targets(v, grid, boxes, torch.tensor([0, 1]), **kw)
    assert torch.equal(got, roi_pool_targets_ref(v, grid, boxes, torch.tensor([0, 1]), **kw))


def test_fp32_under_autocast():
    """The pooling matmul stays fp32 under autocast: the result is the one outside it."""
    v = torch.randn(T, D)
    want = roi_pool_targets_ref(v, GRID, BOXES, BOX_IMAGE, bins=(2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = roi_pool_targets(v, GRID, BOXES, BOX_IMAGE, bins=(2, 3))
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_no_boxes_and_gradient():
    v = torch.randn(T, D, requires_grad=True)
    empty = roi_pool_targets(v, GRID, BOXES[:0], BOX_IMAGE[:0], bins=(2, 3))
    assert empty.shape == (0, 6, D)
    got = roi_pool_targets(v, GRID, BOXES, BOX_IMAGE, bins=(2, 3), pooling="bilinear")
    w = torch.randn_like(got)
    (g,) = torch.autograd.grad((got * w).sum(), v)
    v2 = v.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((roi_pool_targets_ref(v2, GRID, BOXES, BOX_IMAGE, bins=(2, 3),
                                                         pooling="bilinear") * w).sum(), v2)
    assert torch.equal(g, g_ref)


def test_a_forced_fast_backend_raises():
    v = torch.randn(T, D)
    with force_backend("triton"), pytest.raises(RuntimeError, match="no Triton kernel"):
        roi_pool_targets(v, GRID, BOXES, BOX_IMAGE, bins=(2, 3))


def _box(row, value):
    b = BOXES.clone()
    b[row] = torch.tensor(value)
    return b


BAD = [
    (dict(vision_tokens=torch.randn(T, D).int()), TypeError, r"vision_tokens must have dtype in"),
    (dict(vision_tokens=torch.randn(T)), ValueError, r"vision_tokens must be 2-D"),
    (dict(vision_tokens=torch.randn(T + 1, D)), ValueError, r"grid_thw adds up to 66 .*vision_tokens has T = 67"),
    (dict(pooling="max"), ValueError, r"pooling must be one of"),
    (dict(sampling_ratio=0), ValueError, r"sampling_ratio must be a positive int or -1"),
    (dict(sampling_ratio=2.0), TypeError, r"sampling_ratio must be an int"),
    (dict(bins=(2, 0)), ValueError, r"bins\[1\]"),
    (dict(bins=6), TypeError, r"bins must be a pair"),
    (dict(merge=0), ValueError, r"merge must be >= 1"),
    (dict(patch=0), ValueError, r"patch must be >= 1"),
    (dict(boxes=_box(2, [50.0, 0.0, 40.0, 10.0])), ValueError, r"boxes row 2 .*x1 < x0"),
    (dict(boxes=_box(1, [150.0, 10.0, 170.0, 20.0])), ValueError, r"boxes row 1 .*empty after clipping"),
    (dict(boxes=_box(0, [0.0, 0.0, float("nan"), 1.0])), ValueError, r"boxes row 0 .*not finite"),
    (dict(boxes=BOXES.long()), ValueError, r"boxes must be a floating tensor"),
    (dict(box_image=torch.tensor([0, 3, 1, 0])), ValueError, r"box_image row 1 = 3 is out of range for 3 images"),
    (dict(box_image=BOX_IMAGE.float()), ValueError, r"box_image must be an integer tensor"),
    (dict(grid_thw=torch.tensor([[2, 14, 10], [1, 6, 18], [1, 4, 4]])), ValueError, r"grid_thw row 0 .*t = 1"),
    (dict(grid_thw=torch.tensor([[1, 13, 10], [1, 6, 18], [1, 4, 4]])), ValueError, r"grid_thw row 0 .*multiples"),
]


@pytest.mark.parametrize("over, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_names_the_argument(over, error, match):
    args = dict(vision_tokens=torch.randn(T, D), grid_thw=GRID, boxes=BOXES, box_image=BOX_IMAGE, bins=(2, 3))
    args.update(over)
    with pytest.raises(error, match=match):
        roi_pool_targets(args.pop("vision_tokens"), args.pop("grid_thw"), args.pop("boxes"), args.pop("box_image"),
                         **args)
