"""Optional fused projection weights for the decode step: q/k/v as one GEMM and
gate/up as one GEMM per layer (LatentEngine(..., fuse_projections=True)).

At batch 1 a decode step is a chain of GEMVs; the k and v projections of a GQA model
are small (Qwen2.5-VL-7B: 512 x 3584, 3.7 MB) and run far from the memory roofline on
their own, and every extra kernel costs a launch gap even inside a CUDA graph. One
(q+k+v) GEMM and one (gate+up) GEMM per layer remove 3 kernels per layer and let the
small projections ride on the large ones.

The fused weights are copies (Qwen2.5-VL-7B: +0.9 GB q/k/v, +7.6 GB gate/up in bf16).
They are refreshed, in place (captured graphs keep their pointers), whenever a source
parameter changed: an in-place update through autograd-visible ops (optimizer steps,
``with torch.no_grad(): p.add_(...)``) bumps the parameter's version counter, a
replaced ``p.data`` changes its data pointer; both are checked on the host before each
engine call. Writes through ``p.data.<op>_()`` are invisible to that check: call
``LatentEngine.refresh_weights()`` after them.

Layers whose projections are not plain ``nn.Linear`` (e.g. PEFT/LoRA wrappers) are not
fused: they keep calling the modules, so adapters stay in the path.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear


class FusedLayer:
    def __init__(self, layer):
        mlp = layer.mlp
        self.q, self.k, self.v = layer.q_proj, layer.k_proj, layer.v_proj
        self.gate, self.up, self.act = mlp.gate_proj, mlp.up_proj, mlp.act_fn
        self.down = mlp.down_proj
        self.qkv_sizes = [m.out_features for m in (self.q, self.k, self.v)]
        self.gu_sizes = [self.gate.out_features, self.up.out_features]
        with torch.no_grad():
            self.qkv_w = torch.cat([m.weight for m in (self.q, self.k, self.v)])
            self.qkv_b = self._cat_bias((self.q, self.k, self.v))
            self.gu_w = torch.cat([self.gate.weight, self.up.weight])
            self.gu_b = self._cat_bias((self.gate, self.up))

    @staticmethod
    def _cat_bias(mods):
        biases = [m.bias for m in mods]
        if all(b is None for b in biases):
            return None
        return torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                                device=m.weight.device)
                          for b, m in zip(biases, mods)])

    def sources(self) -> list[torch.Tensor]:
        return [p for m in (self.q, self.k, self.v, self.gate, self.up) for p in (m.weight, m.bias) if p is not None]

    @torch.no_grad()
    def copy_from_sources(self) -> None:
        for fused, bias, mods in ((self.qkv_w, self.qkv_b, (self.q, self.k, self.v)),
                                  (self.gu_w, self.gu_b, (self.gate, self.up))):
            row = 0
            for m in mods:
                n = m.out_features
                fused[row:row + n].copy_(m.weight)
                if bias is not None and m.bias is not None:
                    bias[row:row + n].copy_(m.bias)
                row += n

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) as column views of one GEMM's output (strided; the decode ops
        accept strided inputs)."""
        return F.linear(x, self.qkv_w, self.qkv_b).split(self.qkv_sizes, dim=-1)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gu_w, self.gu_b).split(self.gu_sizes, dim=-1)
        return self.down(self.act(gate) * up)


class FusedProjections:
    """Per decoder layer a FusedLayer, or None where the modules are not plain Linear."""

    def __init__(self, layers):
        self.layers: list[FusedLayer | None] = []
        for layer in layers:
            mlp = layer.mlp
            mods = (layer.q_proj, layer.k_proj, layer.v_proj, getattr(mlp, "gate_proj", None),
                    getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None))
            ok = all(_plain_linear(m) for m in mods) and callable(getattr(mlp, "act_fn", None))
            self.layers.append(FusedLayer(layer) if ok else None)
        self._stamp = self._versions()

    @property
    def any(self) -> bool:
        return any(f is not None for f in self.layers)

    def _versions(self) -> tuple:
        return tuple((p._version, p.data_ptr()) for f in self.layers if f is not None for p in f.sources())

    def refresh(self, *, force: bool = False) -> bool:
        """Re-copy the fused weights if a source parameter changed (or ``force``)."""
        stamp = self._versions()
        if not force and stamp == self._stamp:
            return False
        for f in self.layers:
            if f is not None:
                f.copy_from_sources()
        self._stamp = self._versions()
        return True
