"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the policy module of either stage: ``--fsdp``.

Why ``fully_shard`` directly and not accelerate's FSDP plugin (``fsdp_version: 2``): accelerate
1.16 turns an FSDP plugin into ``DistributedType.FSDP`` only for the GPU-like distributed
types (accelerate/state.py, ``AcceleratorState.__init__``: the list MULTI_GPU, MULTI_NPU, ...
has no MULTI_CPU), so on CPU / gloo the plugin is silently dropped and ``prepare`` wraps the
model in DDP. One code path that the CPU tests run is the one the GPUs run: medlvr shards
the module itself, here, and the loop (medlvr/train/loop.py) hands only the optimizer,
scheduler and data to accelerate. Accelerate's gloo / NCCL process group, split batches,
autocast and its DTensor-aware ``clip_grad_norm_`` are kept.

Units (each one all-gather in forward, one reduce-scatter in backward; the per-block recipe
of pytorch/torchtitan, torchtitan/models/llama3/infra/parallelize.py ``apply_fsdp`` at
018740b: embedding, each block, the output head, then the root):

- every vision block (``model.visual.blocks[i]``),
- every decoder layer (``language_model.layers[i]``; peft's LoRA A/B live inside them),
- the input embedding (peft's trainable latent-token rows live in its wrapper),
- the lm_head (tied to the embedding: one unit with it),
- the root (the LatentLM): the rest (final norm, patch embed, merger, the latent projector).

The lm_head is a unit of its own so that its (V, D) weight is gathered only around the loss.
The fused lm_head ops (medlvr.ops.fused_logprobs) read ``head.weight`` without calling the
head's forward, so FSDP's hooks would not run and they would see the DTensor shard.
:func:`medlvr.policy.head.with_head_weight` calls them through a method registered with FSDP's
``register_fsdp_forward_method``: FSDP unshards the head before (the full weight is FSDP's own
unsharded parameter, no extra copy), reshards after, all-gathers again in backward and
reduce-scatters the (V, D) gradient the op hands out, as for any forward.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from medlvr.models.hf import decoder, unwrap

__all__ = ["shard", "is_sharded", "gathered", "ensure_process_group",
           "gather_trainable", "load_full", "full_optimizer_state", "load_full_optimizer_state"]

def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; one process (a 1-GPU run, or developing on a CPU) gets a
    world of one, in memory (no port)."""
    if dist.is_available() and not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _units_in(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is or holds FSDP units (a LatentLM whose model sits in a sharded
    VLPO scorer holds DTensor shards without being a unit itself)."""
    return bool(_units_in(module))


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every FSDP unit in ``module`` unsharded for the duration (nothing without units).

    For code that reads the weights outside a unit's forward: the rollout engine and the
    scoring helpers call submodules (q_proj, the merger, the final norm) directly, so FSDP's
    hooks would leave them as shards. The units stay gathered through their own forwards too
    (no reshard after forward inside); a backward reshards them as usual. The cost is the
    whole model in the all-gather dtype on every rank while inside: verl's FSDP rollout
    gathers the same once per rollout phase (docs/distributed.md)."""
    units = _units_in(module)
    inner = units[1:]  # modules() is pre-order: units[0] is the root, which keeps its setting
    if units:
        # FSDP2 makes the first unit whose forward runs the root (FSDPState._lazy_init) and
        # fails when that is not the outermost one: here a vision block would run before the
        # scorer's forward ever did. torch has no public call for this choice.
        units[0]._get_fsdp_state()._lazy_init()
    for u in inner:
        u.set_reshard_after_forward(False, recurse=False)
    try:
        for u in units:
            u.unshard()
        yield
    finally:
        for u in inner:
            u.set_reshard_after_forward(True, recurse=False)
        for u in units:
            u.reshard()


def _units(lm: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The FSDP units below the root, in forward order (bottom-up is what fully_shard needs:
    a unit takes the parameters that no unit inside it took)."""
    base = unwrap(lm.model)
    units: list[Any] = []
    visual = getattr(getattr(base, "model", None), "visual", None)
    if visual is not None:
        units.extend(visual.blocks)
    lm_dec = decoder(base)
    embed = lm_dec.embed_tokens if hasattr(lm_dec, "embed_tokens") else base.get_input_embeddings()
    units.extend(lm_dec.layers)
    head = base.lm_head
    if head.weight is getattr(base.get_input_embeddings(), "weight", None):
        units.append([embed, head])  # tied: one parameter, one unit
    else:
        units.extend([embed, head])
    return units


def shard(lm: nn.Module, *, device: torch.device, mixed_precision: str = "no") -> nn.Module:
    """Shard ``lm`` (a stage-1 LatentLM or VLPO's PolicyScorer: a module whose ``.model`` is
    the HF model, maybe peft-wrapped) in place over all processes; returns it.

    mixed_precision "bf16" / "fp16": the all-gathers run in that dtype (half the traffic and
    the unsharded memory) and gradients are reduced in fp32; the sharded (master) weights and
    the optimizer stay fp32. The loop's autocast is kept on top (the same compute as DDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    lm.to(device)
    _broadcast_from_main(lm)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    # cast_forward_inputs off: the module's inputs are a Batch (ids, boxes, pixels); autocast
    # already decides the compute dtype of every op.
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None,
                              cast_forward_inputs=False)
    for unit in _units(lm):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(lm, mesh=mesh, mp_policy=mp)
    return lm


def _broadcast_from_main(module: nn.Module) -> None:
    """Every process starts from the main process's weights and buffers (what DDP does when it
    wraps a model): fully_shard keeps each process's own slice, so weights initialised from
    an unseeded RNG would otherwise be a patchwork of different inits."""
    if dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------- full state


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_trainable(module: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU tensors of the state entries in ``names``, on the main process
    (the others get {}). Collective: every process calls it. One tensor is gathered at a
    time, so the peak beyond the shards is the largest trainable tensor, not the model."""
    main = dist.get_rank() == 0
    out = {}
    for name, t in module.state_dict().items():
        if name in names:
            full = _full(t.detach())
            if main:
                out[name] = full.cpu().clone().contiguous()
            del full
    return out


def load_full(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full tensors (a run folder's model.safetensors) into the sharded module: each
    process keeps its shard (torch.distributed.checkpoint's full-state-dict loader)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _raw(optimizer):
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer
        optimizer = optimizer.optimizer
    return optimizer


def full_optimizer_state(module: nn.Module, optimizer) -> dict:
    """The optimizer state as one full state dict keyed by parameter name (on the main
    process; {} elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, _raw(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, _raw(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
