"""ROI alignment loss (stage 1): naive PyTorch vs torchvision roi_align + loss vs medlvr.

    python benchmarks/bench_roi_align_loss.py            # CUDA: the issue's shape; CPU: small shapes
    python benchmarks/bench_roi_align_loss.py --quick    # smallest shapes (smoke test, any device)
    python benchmarks/bench_roi_align_loss.py --threads 1 --grad-vision   # CPU results as committed
    TRITON_INTERPRET=1 python benchmarks/bench_roi_align_loss.py --breakdown --threads 1   # CPU breakdown
    python benchmarks/bench_roi_align_loss.py --breakdown  # CUDA: kernels, kernel ms, syncs per call

Providers (each in a dtype it supports: the "dtype" column says which):
  naive torch      mask and mean per box: a Python loop over boxes builds each box's
                   K × (H·W) overlap-weight mask, pools with a matmul (targets
                   materialised), then the loss; autograd does the backward.
  torchvision      torchvision.ops.roi_align(aligned=True) on the token grid (the tokens
                   viewed as an (I, D, H, W) map, which roi_align makes contiguous: a
                   full copy) + the loss. Bilinear pooling, so it is a peer of
                   pooling="bilinear", the closest library op to either pooling. It has no
                   bf16 CUDA kernel: it then runs on fp32 copies made outside the timing.
  medlvr           medlvr.ops.roi_align_loss, boxes per call (prepare_roi_geometry in the
                   call: the boxes checked and laid out every call), with a geometry prepared
                   once per batch (geometry=), and (CUDA) that call captured in a CUDA
                   graph. On CUDA the Triton kernels; on CPU the reference path (Triton
                   needs a GPU): the table says "reference path".
  stage-1 term     medlvr.train.sft.roi.roi_alignment as stage 1 calls it: gather each
                   box's sample from the latent states (B K D), the loss per box, the mean
                   per sample, and the backward into the latent states; with the batch's
                   geometry from collate, and with one prepared in the call.
Columns: forward and forward+backward (latents' gradient; vision tokens' too with
--grad-vision) median ms, peak extra memory of forward+backward, and the memory floor
(roi_align_loss_memory_floor in the provider's dtype: latents + the vision tokens some
bin weights, read once per pass, + the gradients written) over the copy bandwidth
measured in the same run. "x floor" = forward+backward ms / floor ms. The target
on an H200 (16 images × 32×32 tokens, D = 3584, 4 boxes per image, K = 8, bf16):
forward+backward <= 3x the floor. All images in a case have the same size so that
torchvision can take one 4-D map.

--breakdown: per call, host time, launches and host reads (syncs on a GPU) of the op
with the geometry prepared in the call (boxes per call), with a prepared geometry, the preparation itself and the stage-1 term
(benchmarks/_launches.py says how each is counted on CPU and on CUDA).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import parser, peak_extra_bytes, report, time_ms  # noqa: E402
from medlvr.engine.graphs import capture_graph  # noqa: E402
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
    boxes = torch.cat([xy, xy + wh], 1)  # on the CPU, as a data loader gives them
    box_image = torch.arange(n_img).repeat_interleave(boxes_per_image)
    grid_thw = torch.tensor([[1, 2 * side, 2 * side]] * n_img)
    tokens = torch.randn(n_img * side * side, D, generator=g).to(device=device, dtype=dtype)
    return grid_thw, boxes, box_image, tokens


class Case:
    """One shape: inputs, a stage-1 batch (one image per sample), and the providers' calls."""

    def __init__(self, n_img, side, D, per_image, bins, dtype, *, device, grad_vision):
        self.device, self.bins, self.grad_vision = device, bins, grad_vision
        self.grid_thw, self.boxes, self.box_image, self.tokens = make_case(n_img, side, D, per_image, dtype, device)
        R, K = self.boxes.shape[0], bins[0] * bins[1]
        g1 = torch.Generator().manual_seed(1)
        self.latents = torch.randn(R, K, D, generator=g1).to(device=device, dtype=dtype).requires_grad_(True)
        self.hidden = torch.randn(n_img, K, D, generator=g1).to(device=device, dtype=dtype).requires_grad_(True)
        self.tokens.requires_grad_(grad_vision)
        self.grid_hw = [(side, side)] * n_img
        try:
            from medlvr.ops.roi_align_loss import prepare_roi_geometry
        except ImportError:  # an op without prepared geometry (the breakdown's "before" tree, main at dab2162)
            self.geometry = None
        else:
            self.geometry = prepare_roi_geometry(self.grid_thw, self.boxes, self.box_image, bins=bins).to(device)
        # the batch as accelerate hands it to the stage-1 step: every tensor on the device
        self.batch = {"image_grid_thw": self.grid_thw.to(device), "roi_boxes": self.boxes.to(device),
                      "roi_image": self.box_image.to(device), "roi_sample": self.box_image.to(device)}
        self.name = (f"{n_img}x{side}x{side} D={D} R={R} K={K} {str(dtype).replace('torch.', '')}"
                     + (" +dv" if grad_vision else ""))

    def clear(self):
        for x in (self.latents, self.hidden, self.tokens):
            x.grad = None

    def op_boxes_per_call(self):
        """The geometry prepared in the call from the boxes (on their device), then the op."""
        from medlvr.ops.roi_align_loss import prepare_roi_geometry

        geometry = prepare_roi_geometry(self.grid_thw, self.boxes, self.box_image, bins=self.bins)
        return roi_align_loss(self.latents, self.tokens, geometry=geometry.to(self.latents.device),
                              detach_target=not self.grad_vision)

    def op_geometry(self):
        return roi_align_loss(self.latents, self.tokens, geometry=self.geometry, detach_target=not self.grad_vision)

    def stage1(self, with_geometry: bool):
        from medlvr.ops.roi_align_loss import prepare_roi_geometry
        from medlvr.train.sft.roi import roi_alignment

        geometry = self.geometry if with_geometry else prepare_roi_geometry(
            self.batch["image_grid_thw"], self.batch["roi_boxes"], self.batch["roi_image"], bins=self.bins)
        # stage 1 adds the per-sample term to the per-sample CE and takes the batch mean
        return roi_alignment(self.hidden, self.tokens, self.batch["roi_sample"], geometry).mean()


def _graphed(fn, case: Case):
    """(forward replay, forward+backward replay) of ``fn`` captured in CUDA graphs."""
    wrt = [case.latents] + ([case.tokens] if case.grad_vision else [])

    def fwd_bwd():
        out = fn()
        return out, torch.autograd.grad(out, wrt)

    graphs = [capture_graph(body, warmup=lambda body=body: [body() for _ in range(2)])[0] for body in (fn, fwd_bwd)]
    return graphs[0].replay, graphs[1].replay


def _dtype_fallback(case: Case, fn_of):
    """Run ``fn_of(latents, tokens)`` in the case's dtype, or in fp32 when the peer has no
    kernel for it (torchvision's roi_align has none for bf16 on CUDA)."""
    try:
        fn_of(case.latents, case.tokens).backward()
        case.clear()
        return (lambda: fn_of(case.latents, case.tokens)), case.latents, case.tokens, ""
    except RuntimeError as e:
        if "not implemented for" not in str(e):
            raise
        z = case.latents.detach().float().requires_grad_(True)
        v = case.tokens.detach().float().requires_grad_(case.grad_vision)
        return (lambda: fn_of(z, v)), z, v, f"fp32 copies ({str(e).split(':')[-1].strip()[:60]})"


def bench_case(case: Case, *, args, bw):
    device = case.device
    on_cuda = device.type == "cuda"
    path = "triton" if on_cuda else "reference path"
    providers = {
        "naive torch (mask+mean per box)": lambda: (lambda z, v: naive_loss(z, v, case.grid_hw, case.batch["roi_boxes"],
                                                                          case.batch["roi_image"], case.bins)),
        "torchvision roi_align + loss": lambda: (lambda z, v: torchvision_loss(z, v, case.grid_hw,
                                                                             case.batch["roi_boxes"],
                                                                             case.batch["roi_image"], case.bins)),
        f"medlvr ({path}), boxes per call": lambda: case.op_boxes_per_call,
        f"medlvr ({path}), prepared geometry": lambda: case.op_geometry,
        f"stage-1 term ({path}), boxes per call": lambda: (lambda: case.stage1(False)),
        f"stage-1 term ({path}), geometry from collate": lambda: (lambda: case.stage1(True)),
    }
    if on_cuda:
        providers["medlvr (triton), prepared geometry, CUDA graph"] = lambda: case.op_geometry
    rows = []
    for name, make in providers.items():
        row = {"case": case.name, "provider": name}
        try:
            fn, z, v, note = make(), case.latents, case.tokens, ""
            if name.startswith(("naive", "torchvision")):
                fn, z, v, note = _dtype_fallback(case, fn)
            # stage 1 detaches the targets (roi_alignment's default): the latent states' gradient only
            wrt = [case.hidden] if name.startswith("stage-1") else [z] + ([v] if case.grad_vision else [])

            def fwd_bwd(fn=fn, wrt=wrt):
                out = fn()
                torch.autograd.grad(out, wrt)
                return out

            fwd, fb = (lambda fn=fn: fn().detach()), fwd_bwd
            if name.endswith("CUDA graph"):
                fwd, fb = _graphed(fn, case)
            floor = roi_align_loss_memory_floor(v, case.grid_thw, case.boxes, case.box_image, bins=case.bins,
                                                pooling="bilinear" if name.startswith("torchvision") else "area",
                                                latent_dtype=z.dtype, detach_target=not case.grad_vision)
            row["dtype"] = str(v.dtype).replace("torch.", "") + (f" ({note})" if note else "")
            row["fwd ms"] = time_ms(fwd, device=device, warmup=args.warmup, iters=args.iters)
            row["fwd+bwd ms"] = time_ms(fb, device=device, warmup=args.warmup, iters=args.iters)
            row["peak extra MB"] = peak_extra_bytes(fb, device=device) / 1e6
            floor_ms = floor["forward_backward"] / bw * 1e3
            row.update({"floor MB": floor["forward_backward"] / 1e6, "floor ms": floor_ms,
                        "x floor": row["fwd+bwd ms"] / floor_ms})
        except Exception as e:  # a peer that cannot run is named with the reason, never a crash
            row["dtype"] = f"could not run: {type(e).__name__}: {str(e)[:120]}"
        case.clear()
        rows.append(row)
    return rows


def breakdown(case: Case, *, args):
    """Host time, launches and host reads per call: boxes per call, prepared geometry, the preparation, stage 1."""
    from benchmarks._launches import cpu_accounting, cuda_accounting

    import importlib

    import medlvr

    op = importlib.import_module("medlvr.ops.roi_align_loss")

    on_cuda = case.device.type == "cuda"
    account = cuda_accounting if on_cuda else cpu_accounting
    dv = [case.tokens] if case.grad_vision else []
    wrt, wrt_stage1 = [case.latents] + dv, [case.hidden]  # stage 1 detaches the targets
    calls = {"op, boxes per call: forward": case.op_boxes_per_call,
             "op, boxes per call: forward+backward": lambda: torch.autograd.grad(case.op_boxes_per_call(), wrt),
             "stage-1 term, boxes per call: forward+backward":
                 lambda: torch.autograd.grad(case.stage1(False), wrt_stage1)}
    prepare_roi_geometry = getattr(op, "prepare_roi_geometry", None)  # None on the "before" tree (dab2162)
    if prepare_roi_geometry is not None:
        calls.update({
            "op, prepared geometry: forward": case.op_geometry,
            "op, prepared geometry: forward+backward": lambda: torch.autograd.grad(case.op_geometry(), wrt),
            "stage-1 term, geometry from collate: forward+backward":
                lambda: torch.autograd.grad(case.stage1(True), wrt_stage1),
            "prepare_roi_geometry, boxes on the CPU (collate; once per batch)":
                lambda: prepare_roi_geometry(case.grid_thw, case.boxes, case.box_image, bins=case.bins),
        })
        if on_cuda:
            calls["prepare_roi_geometry, boxes on the GPU (once per batch)"] = lambda: prepare_roi_geometry(
                case.batch["image_grid_thw"], case.batch["roi_boxes"], case.batch["roi_image"], bins=case.bins)
    rows = []
    with medlvr.force_backend("triton"):
        for name, fn in calls.items():
            row = {"case": case.name, "call": name, **account(fn, iters=args.iters, warmup=args.warmup)}
            row["detail"] = row.pop("detail")
            rows.append(row)
            case.clear()
    return rows


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--grad-vision", action="store_true", help="also the vision tokens' gradient (detach_target=False)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable numbers on a shared machine; default: torch's)")
    p.add_argument("--breakdown", action="store_true",
                   help="host time, launches and syncs per call instead of the speed table (CPU: TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.breakdown and device.type != "cuda":
        # the kernels must reach the interpreter's launcher to be counted and skipped
        # (read when medlvr.kernels.roi_align_loss is first imported, which is below)
        os.environ["TRITON_INTERPRET"] = "1"
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
    if args.breakdown and device.type != "cuda":
        # host work depends on the boxes and images, not on D: the 16 images and
        # 64 boxes, with a small D (the kernels are skipped on the CPU anyway)
        cases = [(16, 32, 64, 4, (2, 4), torch.float32)] if not args.quick else [(2, 8, 16, 2, (2, 4), torch.float32)]
    suffix = ("-quick" if args.quick else "") + ("-dv" if args.grad_vision else "")
    if args.breakdown:
        rows = []
        for n_img, side, D, per_image, bins, dtype in cases:
            rows += breakdown(Case(n_img, side, D, per_image, bins, dtype, device=device,
                                   grad_vision=args.grad_vision), args=args)
        notes = ["CUDA: host ms = time to issue the call (GPU idle before it); kernels, kernel ms (summed device "
                 "time), memcpy/memset and synchronising runtime calls from torch.profiler, per call."
                 if device.type == "cuda" else
                 "CPU (no GPU): Triton launches counted and skipped, so host ms is the wrapper's own host time on "
                 "this CPU (torch ops on small CPU tensors included; Triton's GPU launcher overhead and every "
                 "kernel time are NOT measured). torch kernels = aten ops that are not views or allocations (each "
                 "at least one launch on a GPU). host reads = torch calls that read tensor data on the host: a "
                 "device sync each when the tensor lives on a GPU, as the stage-1 batch does (accelerate moves it); "
                 "the op rows' boxes are on the CPU. host-made tensors = tensors made from host data, each a "
                 "host-to-device copy (a sync from pageable memory) when the latents are on a GPU. A CPU run cannot "
                 "see the one copy that moves a CPU-prepared geometry to a GPU (boxes per call, boxes on the CPU)."]
        report("roi_align_loss-breakdown" + suffix, rows, device=device, out=args.out, x="call", y="host ms",
               group="case", title="ROI alignment loss: where a call's time goes", notes=notes)
        return
    bw = copy_bandwidth(device, args)
    rows = []
    for n_img, side, D, per_image, bins, dtype in cases:
        rows += bench_case(Case(n_img, side, D, per_image, bins, dtype, device=device, grad_vision=args.grad_vision),
                           args=args, bw=bw)
    notes = [f"Copy bandwidth measured in this run: {bw / 1e9:.1f} GB/s; floor ms = floor MB / that bandwidth, "
             "the floor in the provider's dtype.",
             "medlvr, naive torch and the stage-1 term pool by area, torchvision bilinearly (its floor uses "
             "bilinear's token set). The stage-1 rows include the gather of each box's latents from the (B K D) "
             "latent states and its backward; their floor is the op's.",
             "Boxes per call: on the CPU for the op (as a data loader gives them), on the device for the stage-1 "
             "term (as accelerate moves the batch); naive/torchvision read device copies."]
    if device.type != "cuda":
        notes.append("CPU: medlvr runs its reference path (Triton kernels need a GPU); these numbers say nothing "
                     "about the kernels.")
    report("roi_align_loss" + suffix, rows, device=device, out=args.out, x="case", y="fwd+bwd ms",
           title="ROI alignment loss", notes=notes)


if __name__ == "__main__":
    main()
