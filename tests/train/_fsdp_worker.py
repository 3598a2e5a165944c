"""One rank of ``medlvr sft`` / ``medlvr vlpo`` (tests/train/test_fsdp.py launches it with
torchrun, or alone), with a spy on the fused lm_head losses.

Usage: python _fsdp_worker.py SPY_JSON {sft|vlpo} ARGS...

The spy records, for every call of the stage-1 fused cross-entropy and of the fused VLPO
loss: whether the lm_head was FSDP-sharded, the shape of its parameter's local shard outside
the call, and what the op received as the weight (a plain tensor of the full (V, D) shape,
or a DTensor shard).

vlpo: the outcome reward is replaced by one that varies with the sampled text (the character
codes mod 5), so that a random model's groups have non-zero advantages and the update is not
empty; it depends on the rollouts only, so runs that sample the same rollouts get the same
rewards."""
import json
import sys

import torch
from torch.distributed.tensor import DTensor

import medlvr.policy.head as head_choice
import medlvr.policy.latent as latent
import medlvr.train.vlpo.objective as vlpo
import medlvr.train.vlpo.step as vlpo_step
from medlvr.cli import main
from medlvr.policy.fsdp import is_sharded

calls = []


def spy_head():
    """Every call of the lm_head choice's weight path (medlvr/policy/head.py), named by the
    module whose fused op it runs (set by spy_op below when the op is called)."""
    inner = head_choice.with_head_weight

    def spy(head, fn, *args, **kwargs):
        w = head.weight
        calls.append({"head_sharded": is_sharded(head), "param_is_dtensor": isinstance(w, DTensor),
                      "param_local_shape": list((w.to_local() if isinstance(w, DTensor) else w).shape)})
        return inner(head, fn, *args, **kwargs)

    head_choice.with_head_weight = spy


def spy_op(module, name, weight_pos):
    inner = getattr(module, name)

    def spy(*args, **kwargs):
        w = args[weight_pos]
        calls[-1].update(op=module.__name__, op_weight_is_dtensor=isinstance(w, DTensor), op_weight_shape=list(w.shape))
        return inner(*args, **kwargs)

    setattr(module, name, spy)


def varied_rewards(texts, stopped, records, **_):
    r = [float(sum(map(ord, t)) % 5) for t in texts]
    return {"reward": r, "accuracy": [0.0] * len(texts), "format": [0.0] * len(texts)}


spy_head()
spy_op(latent, "fused_linear_cross_entropy", 1)
spy_op(vlpo_step, "fused_vlpo_loss", 1)
vlpo.outcome_rewards = varied_rewards

if __name__ == "__main__":
    spy_path, argv = sys.argv[1], sys.argv[2:]
    rc = main(argv)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{spy_path}.{rank}", "w") as f:
        json.dump(calls, f)
    if torch.distributed.is_initialized():
        # Leave together: a rank whose peer has already closed its gloo sockets can abort at
        # exit ("terminate called without an active exception"), seen once in ~30 runs.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(rc)
