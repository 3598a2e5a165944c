"""The ROI test case shared by tests/ops/test_roi_align_loss.py and test_roi_geometry.py."""
import torch

CELL = 28  # merge 2 × patch 14: pixels per token side

# Three images of odd token grids (7×5, 3×9, 2×2); the last has no box.
GRID = torch.tensor([[1, 14, 10], [1, 6, 18], [1, 4, 4]])  # 35 + 27 + 4 merged tokens
# box rows: smaller than one token, on the border, whole image, partly outside (clipped)
BOXES = torch.tensor([[30.0, 31.0, 45.5, 40.0],
                      [0.0, 100.0, 140.0, 196.0],
                      [0.0, 0.0, 252.0, 84.0],
                      [-20.0, 10.0, 75.0, 400.0]])
BOX_IMAGE = torch.tensor([0, 0, 1, 0])
BINS = (2, 3)
T = 66  # merged tokens of GRID


def roi_loss(latents, vision_tokens, grid_thw, boxes, box_image, *, bins, merge=2, patch=14, **kw):
    """medlvr.ops.roi_align_loss on boxes in resized pixels: their geometry prepared on the
    boxes' device (prepare_roi_geometry), moved to the latents' device, then the op."""
    from medlvr.ops.roi_align_loss import prepare_roi_geometry, roi_align_loss

    geometry = prepare_roi_geometry(grid_thw, boxes, box_image, bins=bins, merge=merge, patch=patch)
    return roi_align_loss(latents, vision_tokens, geometry=geometry.to(latents.device), **kw)
