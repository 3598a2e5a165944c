"""One rank of ``medlvr sft`` (tests/train/test_fsdp.py launches it with torchrun, or alone),
with a spy on the fused lm_head loss.

Usage: python _fsdp_worker.py SPY_JSON sft ARGS...

The spy records, for every call of the stage-1 fused cross-entropy: whether the lm_head was
FSDP-sharded, the shape of its parameter's local shard outside the call, and what the op
received as the weight (a plain tensor of the full (V, D) shape, or a DTensor shard)."""
import json
import sys

import torch
from torch.distributed.tensor import DTensor

import medlvr.train.latent as latent
from medlvr.cli import main
from medlvr.train.fsdp import is_sharded

calls = []
_with_head_weight, _fused = latent.with_head_weight, latent.fused_linear_cross_entropy


def spy_with_head_weight(head, fn, *args, **kwargs):
    w = head.weight
    calls.append({"head_sharded": is_sharded(head), "param_is_dtensor": isinstance(w, DTensor),
                  "param_local_shape": list((w.to_local() if isinstance(w, DTensor) else w).shape)})
    return _with_head_weight(head, fn, *args, **kwargs)


def spy_fused(hidden, weight, targets, **kwargs):
    calls[-1].update(op_weight_is_dtensor=isinstance(weight, DTensor), op_weight_shape=list(weight.shape),
                     op_weight_requires_grad=weight.requires_grad)
    return _fused(hidden, weight, targets, **kwargs)


latent.with_head_weight, latent.fused_linear_cross_entropy = spy_with_head_weight, spy_fused

if __name__ == "__main__":
    spy_path, argv = sys.argv[1], sys.argv[2:]
    rc = main(argv)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{spy_path}.{rank}", "w") as f:
        json.dump(calls, f)
    sys.exit(rc)
