"""GPT-2 (GPT2LMHeadModel): the architecture of Coconut's public checkpoints.

What differs from the RMSNorm + RoPE decoders the engine's step is written for, and how
each difference is met without touching the Qwen path:
- learned absolute positions: ``position_embedding`` (wpe) is added to every step's
  input, latent or token (GPT2Model adds it to ``inputs_embeds`` the same way), and the
  engine refuses a max_len beyond the table (config.n_positions);
- no rotary embedding: the K/V append still goes through ``rotary_append`` (Triton on
  GPU), with one zero frequency over two dims: cos 0 = 1 and sin 0 = 0, so
  x * 1 + rotate_half(x) * 0 == x exactly and the op is a plain append;
- LayerNorm (weight and bias) for the layer norms and the final ``ln_f``: the module
  itself is called (torch's fused layer_norm kernel on GPU; there is no Triton kernel for
  it, the reference path is the only one). The latent fed back is ln_f's output, as
  Coconut reads ``hidden_states[-1]`` of GPT2LMHeadModel (post ln_f);
- Conv1D projections (weight [in, out]) and the fused ``c_attn`` (q|k|v along the output):
  the modules are called as they are (their layout is theirs), and q/k/v are split from
  c_attn's output. fuse_projections leaves these layers unfused (they already are).
- multi-head attention (Hkv = H), scale Dh^-0.5 (1 with scale_attn_weights=False).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from medlvr.engine.adapters.base import DecoderLayer, TextDecoderAdapter, register
from medlvr.ops.decode import write_feedback


def _split_qkv(c_attn: nn.Module, width: int):
    def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(c_attn(x).split(width, dim=-1))
    return qkv


@register
class GPT2Adapter(TextDecoderAdapter):
    model_types = ("gpt2",)

    def _decoder(self) -> nn.Module:
        return self.model.transformer

    def __init__(self, model: nn.Module):
        cfg = model.config
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("gpt2 configs with scale_attn_by_inverse_layer_idx=True are not supported "
                             "(a per-layer attention scale)")
        super().__init__(model)
        self.position_embedding = self.decoder.wpe
        self.max_positions = int(cfg.n_positions)

    def _init_rotary(self) -> None:
        # Rotary off: one zero frequency (the identity rotation, see the module docstring).
        self.inv_freq = torch.zeros(1, dtype=torch.float32, device=self.decoder.wte.weight.device)
        self.rotary_dim = 2

    def _layer_views(self) -> list[DecoderLayer]:
        return [DecoderLayer(input_norm=blk.ln_1, q_proj=None, k_proj=None, v_proj=None, o_proj=blk.attn.c_proj,
                             post_norm=blk.ln_2, mlp=blk.mlp, qkv=_split_qkv(blk.attn.c_attn, self.hidden_size))
                for blk in self.decoder.h]

    def _attn_scale(self) -> float:
        return self.head_dim ** -0.5 if getattr(self.config, "scale_attn_weights", True) else 1.0

    def _final_norm(self) -> nn.Module:
        return self.decoder.ln_f

    def layer_norm(self, hidden: torch.Tensor, module: nn.Module, eps: float) -> torch.Tensor:
        return module(hidden)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, module: nn.Module,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = residual + x  # LayerNorm: no fused kernel, the add and the module as they are
        return module(hidden), hidden

    def norm_feedback(self, hidden: torch.Tensor, *, out: torch.Tensor, active: torch.Tensor | None = None,
                      projector: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        return write_feedback(self.norm(hidden), out=out, active=active, projector=projector)
