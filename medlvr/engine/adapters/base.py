"""What the engine needs from a Hugging Face model, behind one small interface.

The engine runs every decode step by hand from a model's own modules; it touches the
model only through a ``ModelAdapter``: the decoder's layers (norms, projections, MLP),
the final norm, the embeddings and lm_head, the rotary frequencies, and a ``prefill``
that runs the HF model itself over the prompt and hands back the K/V it cached.

What depends on the transformers version (cache objects and their keyword, output field
names, ``get_rope_index``) lives in medlvr/models/hf.py, which these adapters call.

Adding a model is one small file: subclass ``TextDecoderAdapter`` (plain RoPE decoders)
or ``QwenVLAdapter`` (3-section mRoPE + vision tower), set ``model_types``, and decorate
with ``@register``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from medlvr.models import hf
from medlvr.ops.decode import add_rmsnorm, rmsnorm_feedback

_REGISTRY: dict[str, type["ModelAdapter"]] = {}


def register(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def supports(model: nn.Module) -> bool:
    """Whether an adapter is registered for ``model.config.model_type`` (what callers with a
    fallback, such as evaluation's plain-HF loop, test before choosing the engine)."""
    return getattr(getattr(model, "config", None), "model_type", None) in _REGISTRY


def adapter_for(model: nn.Module) -> "ModelAdapter":
    """The adapter registered for ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(f"model.config.model_type must be one of {supported_model_types()}, got {model_type!r}")
    return _REGISTRY[model_type](model)


class TokenEmbedding:
    """The input embedding lookup of a decode step, safe to capture in a CUDA graph.

    A plain ``nn.Embedding`` is called as it is. peft's trainable-token wrapper (stage-1
    LoRA runs train the rows of the new latent tokens) rebuilds its row-index tensor from
    a Python list and copies the whole (V, D) matrix with the trained rows merged in, on
    every call: a host->device copy that breaks graph capture, and ~1 GB of traffic per
    step at Qwen's vocabulary. Here the indices are a device tensor made once, the base
    rows are looked up, and the trained rows replace them where the id matches:
    the same values as peft's merged weight, without the copy. The trained rows are the
    wrapper's own parameters, read by reference, so optimizer steps are seen.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        layer = getattr(module, "token_adapter", None)
        self.layer = layer if layer is not None and hasattr(layer, "trainable_tokens_delta") else None
        self.base = self.layer.base_layer if self.layer is not None else module
        self.index = {}
        if self.layer is not None:
            dev = self.base.weight.device
            self.index = {name: torch.tensor(list(idx), dtype=torch.long, device=dev)
                          for name, idx in self.layer.token_indices.items()}

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base.weight

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        layer = self.layer
        if layer is None or layer.disable_adapters or layer.merged:
            return out  # merged: the base rows already hold the trained ones
        for name in layer.active_adapters:
            index = self.index.get(name)
            if index is None:
                continue
            hit = ids[..., None] == index  # (..., n): which trained row, if any
            row = layer.trainable_tokens_delta[name][hit.long().argmax(-1)]
            out = torch.where(hit.any(-1, keepdim=True), row.to(out.dtype), out)
        return out


@dataclass(frozen=True)
class DecoderLayer:
    """One pre-norm decoder layer, as module references (not weight copies): the engine
    always sees the model's current weights, and PEFT/LoRA wrappers stay in the path."""

    input_norm: nn.Module  # RMSNorm: .weight, eps (LayerNorm for GPT-2: adapter.norm knows)
    q_proj: nn.Module | None
    k_proj: nn.Module | None
    v_proj: nn.Module | None
    o_proj: nn.Module
    post_norm: nn.Module
    mlp: nn.Module  # act(gate(x)) * up(x) -> down
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # fused (GPT-2)


@dataclass
class Prefill:
    """What the HF prompt forward leaves behind, for the engine's static cache.

    hidden (B D): post-final-norm hidden state at each sample's last prompt token.
    keys / values: per layer (B Hkv S Dh), rotated, as HF cached them (left-padded).
    next_positions (P B) int64: rotary position of the first token after the prompt
        (P = 3 for mRoPE, sections advancing together like text; P = 1 otherwise).
    lengths (B) int64: valid (non-pad) prompt tokens per sample.
    """

    hidden: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    next_positions: torch.Tensor
    lengths: torch.Tensor


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"cannot find the epsilon of norm module {type(norm).__name__}")


class ModelAdapter:
    """Common part: layer views, dimensions and rotary frequencies of a causal decoder.

    Subclasses provide ``_decoder()`` (the module holding embed_tokens / layers / norm),
    ``mrope_section`` and the prompt side (``check_batch``, ``prefill``).
    """

    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.decoder = self._decoder()
        self.config = self.decoder.config
        cfg = self.config
        layer_types = getattr(cfg, "layer_types", None) or []
        if "sliding_attention" in layer_types:
            raise ValueError("sliding-window attention layers are not supported by the latent engine "
                             f"(config.layer_types = {sorted(set(layer_types))})")
        self.hidden_size = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads)
        self.vocab_size = int(cfg.vocab_size)
        self._init_rotary()
        self.layers = self._layer_views()
        self.attn_scale = self._attn_scale()
        self.norm = self._final_norm()
        self.norm_eps = _norm_eps(self.norm)
        self.layer_eps = [(_norm_eps(l.input_norm), _norm_eps(l.post_norm)) for l in self.layers]
        self.embed_tokens = TokenEmbedding(model.get_input_embeddings())
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"{type(model).__name__} has no lm_head (use the *ForCausalLM / "
                             "*ForConditionalGeneration class)")

    # ------------------------------------------------------------ layout (overridden by GPT-2)
    # Learned absolute positions: an nn.Embedding added to every step's input (GPT-2);
    # None for rotary models. max_positions: the table's size (None: unbounded).
    position_embedding: nn.Module | None = None
    max_positions: int | None = None

    def _init_rotary(self) -> None:
        rotary = self.decoder.rotary_emb
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise ValueError("rope types that scale cos/sin (attention_scaling != 1, e.g. yarn, longrope) are not "
                             f"supported, got attention_scaling={rotary.attention_scaling}")
        if getattr(rotary, "rope_type", "default") == "dynamic":
            raise ValueError("rope_type 'dynamic' changes the frequencies with the sequence length; not supported")
        # inv_freq lives on the model's device; rotary_append wants fp32 (rotary_dim / 2).
        self.inv_freq = rotary.inv_freq.detach().to(torch.float32)
        self.rotary_dim = 2 * self.inv_freq.numel()

    def _layer_views(self) -> list[DecoderLayer]:
        return [
            DecoderLayer(input_norm=layer.input_layernorm, q_proj=layer.self_attn.q_proj,
                         k_proj=layer.self_attn.k_proj, v_proj=layer.self_attn.v_proj,
                         o_proj=layer.self_attn.o_proj, post_norm=layer.post_attention_layernorm,
                         mlp=layer.mlp)
            for layer in self.decoder.layers
        ]

    def _attn_scale(self) -> float:
        return float(getattr(self.decoder.layers[0].self_attn, "scaling", self.head_dim ** -0.5))

    def _final_norm(self) -> nn.Module:
        return self.decoder.norm

    # ------------------------------------------------------------ the norms of a step
    def layer_norm(self, hidden: torch.Tensor, module: nn.Module, eps: float) -> torch.Tensor:
        """A layer's input / post-attention norm of one step (B, D) -> (B, D)."""
        return rmsnorm_feedback(hidden, module.weight, eps=eps, out=torch.empty_like(hidden))

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, module: nn.Module,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A residual add and the layer norm after it, (B, D) each -> (normed, residual + x):
        one add_rmsnorm launch where the unfused pair is two (medlvr/ops/decode.py)."""
        return add_rmsnorm(x, residual, module.weight, eps=eps)

    def norm_feedback(self, hidden: torch.Tensor, *, out: torch.Tensor, active: torch.Tensor | None = None,
                      projector: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The final norm, written into ``out`` (the next latent input) for active rows;
        rmsnorm_feedback's contract (medlvr/ops/decode.py)."""
        return rmsnorm_feedback(hidden, self.norm.weight, eps=self.norm_eps, out=out, active=active,
                                projector=projector)

    # ------------------------------------------------------------ per model family
    mrope_section: tuple[int, ...] | None = None

    def _decoder(self) -> nn.Module:
        raise NotImplementedError

    def check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def prefill(self, batch: Mapping[str, torch.Tensor]) -> Prefill:
        raise NotImplementedError

    # ------------------------------------------------------------ shared helpers
    @property
    def num_position_rows(self) -> int:
        return 3 if self.mrope_section is not None else 1

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.base_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.base_weight.dtype

    @staticmethod
    def _check_ids_and_mask(batch: Mapping[str, torch.Tensor]) -> None:
        for name in ("input_ids", "attention_mask"):
            if name not in batch or not isinstance(batch[name], torch.Tensor):
                raise ValueError(f"batch[{name!r}] must be a tensor (B, S), got {type(batch.get(name)).__name__}")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"batch['input_ids'] must have shape (B, S) with S >= 1, got {tuple(ids.shape)}")
        if mask.shape != ids.shape:
            raise ValueError(f"batch['attention_mask'] must have input_ids' shape {tuple(ids.shape)}, "
                             f"got {tuple(mask.shape)}")
        m = mask.bool()
        # Left padding: the last column is a real token of every sample and, per row,
        # no real token comes before a pad (the mask is non-decreasing along S).
        if not bool(m[:, -1].all()) or bool((m[:, :-1] & ~m[:, 1:]).any()):
            raise ValueError("batch['attention_mask'] must be left-padded (0...0 1...1 per row, last column 1): "
                             "generation prompts are padded on the left")

    def _layer_kv(self, output) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cache = hf.output_cache(output)
        keys, values = [], []
        for i in range(len(self.layers)):
            k, v = hf.cache_layer_kv(cache, i)
            keys.append(k)
            values.append(v)
        return keys, values


class TextDecoderAdapter(ModelAdapter):
    """Text-only decoders with plain RoPE (Qwen2/Qwen2.5, Llama): *ForCausalLM.model."""

    def _decoder(self) -> nn.Module:
        return self.model.model

    def check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        self._check_ids_and_mask(batch)
        for name in ("pixel_values", "image_grid_thw"):
            if batch.get(name) is not None:
                raise ValueError(f"batch[{name!r}] was given, but {self.model.config.model_type} has no vision tower")

    def prefill(self, batch: Mapping[str, torch.Tensor]) -> Prefill:
        ids, mask = batch["input_ids"], batch["attention_mask"].long()
        # Left padding: real tokens count positions from 0 (HF generate does the same).
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        keys, values = self._layer_kv(out)
        lengths = mask.sum(-1)
        return Prefill(hidden=out.last_hidden_state[:, -1], keys=keys, values=values,
                       next_positions=lengths[None, :].clone(), lengths=lengths)
