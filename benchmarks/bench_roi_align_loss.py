"""ROI alignment loss (stage 1): naive PyTorch vs torchvision roi_align + loss vs medlvr.

    python benchmarks/bench_roi_align_loss.py            # CUDA: the issue's shape; CPU: small shapes
    python benchmarks/bench_roi_align_loss.py --quick    # smallest shapes (smoke test, any device)
    python benchmarks/bench_roi_align_loss.py --threads 1 --grad-vision   # CPU results as committed

Providers:
  naive torch      mask and mean per box: a Python loop over boxes builds each box's
                   K × (H·W) overlap-weight mask, pools with a matmul (targets
                   materialised), then the loss; autograd does the backward.
  torchvision      torchvision.ops.roi_align(aligned=True) on the token grid (the tokens
                   viewed as an (I, D, H, W) map, which roi_align makes contiguous: a
                   full copy) + the loss. Bilinear pooling, so it is a peer of
                   pooling="bilinear", the closest library op to either pooling.
  medlvr           medlvr.ops.roi_align_loss. On CUDA the Triton kernels; on CPU there is
                   no fast path (Triton needs a GPU), so it is the reference and the
                   table says "reference path".
Columns: forward and forward+backward (latents' gradient; vision tokens' too with
--grad-vision) median ms, peak extra memory of forward+backward, and the memory floor
(roi_align_loss_memory_floor: latents + the vision tokens some bin weights, read once
per pass, + the gradients written) over the copy bandwidth measured in the same run.
"x floor" = forward+backward ms / floor ms (1.0 = at the floor; the issue's target on
an H100 is <= 2 for 16 images × 32×32 tokens, D = 3584, 4 boxes per image, K = 8, bf16).
All images in a case have the same size so that torchvision can take one 4-D map.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import parser, peak_extra_bytes, report, time_ms  # noqa: E402
from medlvr.ops.roi_align_loss import roi_align_loss, roi_align_loss_memory_floor  # noqa: E402

CELL = 28


# ------------------------------------------------------------------ naive providers
def _area_weights(lo, hi, n_bins, size, device):
    """(n_bins, size) overlap weights of token rows/cols, vectorised (lo, hi: 0-d tensors, token units)."""
    s = (hi - lo) / n_bins
    a = lo + s * torch.arange(n_bins, device=device, dtype=torch.float32)[:, None]
    idx = torch.arange(size, device=device, dtype=torch.float32)[None, :]
    return (torch.minimum(idx + 1, a + s) - torch.maximum(idx, a)).clamp(min=0)


def naive_loss(latents, tokens, grid_hw, boxes, box_image, bins):
    """Mask and mean per box; cosine loss, mean over R·K. grid_hw: list of (H, W) per image."""
    gh, gw = bins
    counts = [h * w for h, w in grid_hw]
    offsets = [sum(counts[:b]) for b in range(len(counts))]
    targets = []
    for r in range(boxes.shape[0]):
        b = int(box_image[r])
        h, w = grid_hw[b]
        x0, y0, x1, y1 = (boxes[r] / CELL).unbind()
        x0, x1 = x0.clamp(0, w), x1.clamp(0, w)
        y0, y1 = y0.clamp(0, h), y1.clamp(0, h)
        mask = (_area_weights(y0, y1, gh, h, latents.device)[:, None, :, None]
                * _area_weights(x0, x1, gw, w, latents.device)[None, :, None, :]).reshape(gh * gw, h * w)
        v = tokens[offsets[b]: offsets[b] + h * w].float()
        targets.append(mask @ v / mask.sum(1, keepdim=True))
    t = torch.stack(targets)
    return (1 - F.cosine_similarity(latents.float(), t, dim=-1)).mean()


def torchvision_loss(latents, tokens, grid_hw, boxes, box_image, bins, sampling_ratio=2):
    import torchvision

    h, w = grid_hw[0]
    fmap = tokens.view(len(grid_hw), h, w, -1).permute(0, 3, 1, 2)
    rois = torch.cat([box_image[:, None].to(boxes.dtype), boxes], 1).to(tokens.dtype)
    t = torchvision.ops.roi_align(fmap, rois, bins, spatial_scale=1 / CELL, sampling_ratio=sampling_ratio,
                                  aligned=True)  # (R, D, gh, gw)
    t = t.flatten(2).transpose(1, 2)
    return (1 - F.cosine_similarity(latents.float(), t.float(), dim=-1)).mean()


# ------------------------------------------------------------------ measurement
def copy_bandwidth(device, args) -> float:
    """Bytes/s of a large device copy (read + write), the practical memory floor."""
    nbytes = 1 << 28 if device.type == "cuda" else 1 << 25
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device=device, warmup=args.warmup, iters=args.iters)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_case(n_img, side, D, boxes_per_image, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    px = side * CELL
    R = n_img * boxes_per_image
    wh = (0.15 + 0.45 * torch.rand(R, 2, generator=g)) * px
    xy = torch.rand(R, 2, generator=g) * (px - wh)
    boxes = torch.cat([xy, xy + wh], 1)  # on the CPU: the op reads them without a device sync
    box_image = torch.arange(n_img).repeat_interleave(boxes_per_image)
    grid_thw = torch.tensor([[1, 2 * side, 2 * side]] * n_img)
    tokens = torch.randn(n_img * side * side, D, generator=g).to(device=device, dtype=dtype)
    return grid_thw, boxes, box_image, tokens


def bench_case(n_img, side, D, boxes_per_image, bins, dtype, *, device, args, bw, grad_vision):
    grid_thw, boxes, box_image, tokens = make_case(n_img, side, D, boxes_per_image, dtype, device)
    R, K = boxes.shape[0], bins[0] * bins[1]
    latents = torch.randn(R, K, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    latents.requires_grad_(True)
    tokens.requires_grad_(grad_vision)
    grid_hw = [(side, side)] * n_img
    boxes_dev, box_image_dev = boxes.to(device), box_image.to(device)
    medlvr_name = "medlvr (triton)" if device.type == "cuda" else "medlvr (reference path: no Triton on CPU)"
    providers = {
        "naive torch (mask+mean per box)": lambda: naive_loss(latents, tokens, grid_hw, boxes_dev, box_image_dev,
                                                              bins),
        "torchvision roi_align + loss": lambda: torchvision_loss(latents, tokens, grid_hw, boxes_dev,
                                                                 box_image_dev, bins),
        medlvr_name: lambda: roi_align_loss(latents, tokens, grid_thw, boxes, box_image, bins=bins,
                                            detach_target=not grad_vision),
    }
    floors = {}
    for pooling in ("area", "bilinear"):
        floors[pooling] = roi_align_loss_memory_floor(tokens, grid_thw, boxes, box_image, bins=bins, pooling=pooling,
                                                      detach_target=not grad_vision)
    case = f"{n_img}x{side}x{side} D={D} R={R} K={K} {str(dtype).replace('torch.', '')}" + (
        " +dv" if grad_vision else "")
    rows = []
    for name, fn in providers.items():
        floor = floors["bilinear" if name.startswith("torchvision") else "area"]

        def fwd_bwd(fn=fn):
            out = fn()
            out.backward()
            return out

        def clear():
            latents.grad = None
            tokens.grad = None

        fwd_ms = time_ms(lambda: fn().detach(), device=device, warmup=args.warmup, iters=args.iters)
        fb_ms = time_ms(fwd_bwd, device=device, warmup=args.warmup, iters=args.iters, setup=clear)
        clear()
        peak = peak_extra_bytes(fwd_bwd, device=device)
        clear()
        floor_ms = floor["forward_backward"] / bw * 1e3
        rows.append({"case": case, "provider": name, "fwd ms": fwd_ms, "fwd+bwd ms": fb_ms,
                     "peak extra MB": peak / 1e6, "floor MB": floor["forward_backward"] / 1e6,
                     "floor ms": floor_ms, "x floor": fb_ms / floor_ms})
    return rows


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--grad-vision", action="store_true", help="also the vision tokens' gradient (detach_target=False)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable numbers on a shared machine; default: torch's)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        cases = [(16, 32, 3584, 4, (2, 4), torch.bfloat16)]
        if args.quick:
            cases = [(4, 16, 1024, 4, (2, 4), torch.bfloat16)]
    else:
        cases = [(4, 16, 256, 4, (2, 4), torch.float32)]
        if args.quick:
            cases = [(2, 8, 64, 2, (2, 4), torch.float32)]
    bw = copy_bandwidth(device, args)
    rows = []
    for n_img, side, D, per_image, bins, dtype in cases:
        rows += bench_case(n_img, side, D, per_image, bins, dtype, device=device, args=args, bw=bw,
                           grad_vision=args.grad_vision)
    notes = [f"Copy bandwidth measured in this run: {bw / 1e9:.1f} GB/s; floor ms = floor MB / that bandwidth.",
             "medlvr and naive torch pool by area, torchvision bilinearly (its floor uses bilinear's token set).",
             "Boxes live on the CPU (as a data loader gives them); naive/torchvision get device copies."]
    if device.type != "cuda":
        notes.append("CPU: medlvr runs its reference path (Triton kernels need a GPU); these numbers say nothing "
                     "about the kernels.")
    name = "roi_align_loss" + ("-quick" if args.quick else "") + ("-dv" if args.grad_vision else "")
    report(name, rows, device=device, out=args.out, x="case", y="fwd+bwd ms", title="ROI alignment loss",
           notes=notes)


if __name__ == "__main__":
    main()
