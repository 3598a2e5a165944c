"""Measure one stage-1 step's weight, gradient and Adam bytes per process on the CPU, for
tests/train/test_plan.py: a Qwen2.5-VL at the 7B's width (medlvr.train.plan.QWEN25_VL_7B)
with 2 decoder layers and 2 vision blocks, through the real trainer (build_trainable, the
loop, --fsdp). Bytes are counted the way torch.cuda.memory_allocated counts them: each
distinct storage once, whole (an FSDP shard's padding included).

Usage: [torchrun --nproc_per_node 2] _plan_measure.py OUT_JSON MODE VOCAB DATA_JSONL
MODE: ddp-lora (one process) | fsdp-full | fsdp-lora."""
import copy
import json
import sys

import torch
from torch.distributed.tensor import DTensor


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measured_config(vocab: int) -> dict:
    from medlvr.models.default import ASSETS
    from medlvr.train.plan import QWEN25_VL_7B

    cfg = json.loads((ASSETS / "config.json").read_text())  # the embedded model's, widened below
    cfg["text_config"].update(QWEN25_VL_7B["text_config"], num_hidden_layers=2, vocab_size=vocab)
    cfg["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    cfg["vision_config"].update(QWEN25_VL_7B["vision_config"], depth=2, num_heads=16, fullatt_block_indexes=[1])
    cfg["tie_word_embeddings"] = False
    return cfg


def main(out: str, mode: str, vocab: int, data: str) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from medlvr.models.default import build_processor
    from medlvr.data.records import load_split
    from medlvr.policy.fsdp import gathered, is_sharded
    from medlvr.train.loop import LoopConfig, Updater, train_loop
    from medlvr.policy import build_trainable
    from medlvr.train.sft import SFTObjective, Stage1Config

    cfg = measured_config(vocab)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(cfg)))
    lm = build_trainable(model, build_processor(), Stage1Config(k_latent=2, lora=mode.endswith("lora")))
    seen: dict = {}
    update = Updater.update

    def measuring_update(self):
        seen["grads"] = storage_bytes(p.grad for p in self.module.parameters() if p.grad is not None)
        norm = update(self)
        seen["weights"] = storage_bytes(self.module.parameters())
        seen["adam"] = storage_bytes(t for st in self.optimizer.state.values() for t in st.values()
                                     if torch.is_tensor(t))
        if is_sharded(self.module):  # what VLPO's rollout phase adds: the whole model gathered
            with gathered(self.module):
                seen["gathered"] = storage_bytes(self.module.parameters())
        return norm

    Updater.update = measuring_update
    loop = LoopConfig(out_dir=str(out) + ".run", max_steps=1, batch_size=2, fsdp=mode.startswith("fsdp"),
                      mixed_precision="no", progress=False, max_grad_norm=0.0)
    train_loop(SFTObjective(lm, build_processor(), load_split(data, "train"), loop), loop,
               metrics_path=None)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"config": cfg, **seen}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
