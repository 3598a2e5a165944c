"""The training loop: accelerate (CPU, one GPU, DDP or FSDP from an accelerate config), gradient
accumulation, AdamW + warmup/cosine schedule, atomic checkpoints, exact resume, metrics.

What a *step* is: one optimizer update on the GLOBAL batch (``--batch-size`` samples, split
over the processes by accelerate's ``split_batches``; ``--grad-accum`` micro-batches of that
size per update). So a run's steps, schedule and data order do not depend on the number of
processes, which is what lets the distributed test compare 2 processes with 1.

Data order: epoch e is a permutation of the records drawn from (seed, e) alone (no RNG state
involved); the data position is (epoch, micro-batch index in the epoch). A partial last
micro-batch is dropped, so every update sees the same number of samples.

Checkpoint (``<out>/checkpoints/step-XXXXXXX/``, written to a ``.tmp-`` directory first and
moved with os.replace, so a crash never leaves a half-written checkpoint; ``latest`` names the
newest one, also replaced atomically):
    model.safetensors   trainable parameters of the LatentLM module (LoRA or all)
    optimizer.pt        optimizer state;  scheduler.pt  scheduler state
    rng-<rank>.pt       python / numpy / torch (/ cuda) RNG states of each process
    state.json          step, epoch, micro-batch position, seed
    run.json            what to rebuild before loading the weights (see stage1.load_trained)
``--resume auto`` (or a checkpoint dir) restores all of it and continues exactly.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

CKPT_DIR = "checkpoints"

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclass
class LoopConfig:
    out_dir: str = "runs/sft"
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    stop_after: int | None = None
    mixed_precision: str = "auto"
    metrics: str = "metrics.jsonl"
    report_to: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps: expected >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size / grad_accum: expected >= 1, got {self.batch_size} / {self.grad_accum}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule: expected 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: expected one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.report_to == "tensorboard":
            import importlib.util

            if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
                raise ValueError("report_to: 'tensorboard' needs the tensorboard (or tensorboardX) package, "
                                 "which is not installed; pip install tensorboard, or drop --report-to")
        if Path(self.metrics).suffix not in (".jsonl", ".csv"):
            raise ValueError(f"metrics: expected a .jsonl or .csv file name, got {self.metrics!r}")


class StopTraining(RuntimeError):
    """Raised by ``stop_after`` (a debug switch that simulates a crash for the resume test)."""


class EpochSampler(torch.utils.data.Sampler):
    """Permutation of range(n) that depends on (seed, epoch) only."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class _Collator:
    """Records -> dict batch (tensors are moved by accelerate; records/answers ride along)."""

    def __init__(self, processor, k_latent: int):
        from medlvr.models import latent_token_ids

        self.processor, self.k, self.ids, self.cache = processor, k_latent, latent_token_ids(processor), {}

    def __call__(self, records):
        from medlvr.train.collate import collate

        b = collate(records, self.processor, k_latent=self.k, with_answer=True, latent_token_ids=self.ids,
                    padding_side="right", images_cache=self.cache)
        return {**b.model_inputs(), "labels": b.labels, "latent_start_index": b.latent_start_index,
                "roi_boxes": b.roi_boxes, "roi_image": b.roi_image, "roi_sample": b.roi_sample,
                "roi_geometry": b.roi_geometry}


def make_scheduler(optimizer, cfg: LoopConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def gpu_per_rank() -> bool:
    """Whether this process trains on a GPU: one GPU per rank when there are enough of them
    (NCCL), else every rank on the CPU (gloo). Two NCCL ranks on one GPU fail
    ("ncclInvalidUsage: Duplicate GPU detected"), so a 2-rank launch on a 1-GPU machine
    runs on the CPU instead of crashing."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.cuda.is_available() and torch.cuda.device_count() >= ranks_here


def resolve_mixed_precision(mode: str) -> str:
    """"auto" -> bf16 autocast on a GPU, plain fp32 on the CPU (CPU bf16 autocast is slow
    and only changes numerics there; ask for "bf16" to test the GPU's numerics on a CPU)."""
    if mode not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision: expected one of {MIXED_PRECISION}, got {mode!r}")
    if mode == "auto":
        return "bf16" if gpu_per_rank() else "no"
    return mode


def make_accelerator(mixed_precision: str = "auto", **kwargs):
    """The one place medlvr builds an ``accelerate.Accelerator`` (stage 1, VLPO, the demo).

    cpu=True without a GPU per rank (:func:`gpu_per_rank`): accelerate then forms a gloo
    process group (MULTI_CPU) for torchrun-launched processes; without it each CPU rank
    would train alone."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized

    mode = resolve_mixed_precision(mixed_precision)
    state = AcceleratorState() if is_initialized() else None  # a process-wide singleton
    if state is not None and state.num_processes == 1 and state.mixed_precision != mode:
        # accelerate refuses a second Accelerator with another precision in one process
        # (its state is global). One process is free to run stage 1 in bf16 and evaluate in
        # fp32, so the state is re-made; launched multi-process runs keep the rule.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=not gpu_per_rank(), mixed_precision=mode, **kwargs)


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, lm, optimizer, scheduler, *, out_dir: Path, step: int, epoch: int, micro: int,
                    seed: int, run_meta: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically; every process contributes its RNG state."""
    from safetensors.torch import save_file

    root = out_dir / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    state = accelerator.unwrap_model(lm).trainable_state_dict()
    if accelerator.is_main_process:
        save_file(state, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "epoch": epoch, "micro": micro, "seed": seed,
                                                    "num_processes": accelerator.num_processes}))
        (tmp / "run.json").write_text(json.dumps(run_meta, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        old = sorted(p for p in root.glob("step-*") if p.is_dir())
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """``auto``: the checkpoint named by <out>/checkpoints/latest (None when there is none)."""
    if resume == "auto":
        latest = out_dir / CKPT_DIR / "latest"
        if not latest.is_file():
            return None
        return out_dir / CKPT_DIR / latest.read_text().strip()
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"resume: expected a checkpoint directory with state.json, got {resume}")
    return p


def load_checkpoint(accelerator, lm, optimizer, scheduler, ckpt: Path) -> dict:
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        # Weights and optimizer are process-count independent; only the RNG streams are per process.
        accelerator.print(f"resume: checkpoint written by {state['num_processes']} processes, running "
                          f"{accelerator.num_processes}: RNG streams are not restored exactly")
    weights = load_file(str(ckpt / "model.safetensors"))
    module = accelerator.unwrap_model(lm)
    missing, unexpected = module.load_state_dict(weights, strict=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if unexpected or trainable - set(weights):
        raise ValueError(f"{ckpt}: weights do not match the model (missing {sorted(trainable - set(weights))[:5]}, "
                         f"unexpected {unexpected[:5]})")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = ckpt / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """One row per logged step to JSONL or CSV (main process), and to accelerate's trackers."""

    def __init__(self, path: Path, accelerator, *, append: bool):
        self.path, self.acc = path, accelerator
        self.csv = path.suffix == ".csv"
        self._fields: list[str] | None = None
        if accelerator.is_main_process and not append and path.exists():
            path.unlink()

    def write(self, row: dict) -> None:
        if self.acc.is_main_process:
            if self.csv:
                new = not self.path.exists()
                if self._fields is None:
                    self._fields = list(row)
                with self.path.open("a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
                    if new:
                        w.writeheader()
                    w.writerow(row)
            else:
                with self.path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        if self.acc.trackers:
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])


# ----------------------------------------------------------------------------- the loop


def _micro_batches(dl, sampler: EpochSampler, epoch: int, skip: int, accelerator) -> Iterator[tuple[int, int, Any]]:
    """Endless (epoch, index-in-epoch after this batch, batch) over epochs, starting at (epoch, skip)."""
    from accelerate.data_loader import skip_first_batches

    while True:
        # The prepared loader re-sets its sampler's epoch from its own counter at each __iter__
        # (skip_first_batches copies that counter): set both so they agree after a resume.
        dl.set_epoch(epoch)
        sampler.set_epoch(epoch)
        it = skip_first_batches(dl, skip) if skip else dl
        i = skip
        for batch in it:
            i += 1
            yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def train_loop(lm, processor, records: Sequence[Any], cfg: LoopConfig, *, base: str = "default", desc: str = "train",
               accelerator=None, extra_meta: dict | None = None) -> dict:
    """Train ``lm`` (a stage1.LatentLM) on ``records``; returns the last logged metrics plus
    ``final_dir`` (<out>/final: run.json + model.safetensors)."""
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    if accelerator is None:
        accelerator = make_accelerator(cfg.mixed_precision, log_with=cfg.report_to, project_dir=str(out),
                                       dataloader_config=DataLoaderConfiguration(split_batches=True))
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size: expected a multiple of the {accelerator.num_processes} processes, got {cfg.batch_size}")
    if len(records) < cfg.batch_size:
        raise ValueError(f"records: expected at least batch_size={cfg.batch_size} records, got {len(records)}")
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    sampler = EpochSampler(len(records), cfg.seed)
    dl = torch.utils.data.DataLoader(_ListDataset(records), batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                     collate_fn=_Collator(processor, lm.cfg.k_latent), num_workers=0)
    params = [p for p in lm.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, eps=cfg.adam_eps)
    scheduler = make_scheduler(optimizer, cfg)
    lm.train()
    lm, optimizer, dl, scheduler = accelerator.prepare(lm, optimizer, dl, scheduler)

    run_meta = {"base": base, "stage1": asdict(accelerator.unwrap_model(lm).cfg), "loop": asdict(cfg), **(extra_meta or {})}
    step, epoch, micro = 0, 0, 0
    ckpt = find_checkpoint(cfg.resume, out) if cfg.resume else None
    if ckpt is not None:
        st = load_checkpoint(accelerator, lm, optimizer, scheduler, ckpt)
        step, epoch, micro = st["step"], st["epoch"], st["micro"]
        accelerator.print(f"resumed from {ckpt} at step {step} (epoch {epoch}, micro-batch {micro})")
    if cfg.report_to:
        accelerator.init_trackers(out.name, config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
    metrics = MetricsWriter(out / cfg.metrics, accelerator, append=ckpt is not None)

    per_update = cfg.batch_size * cfg.grad_accum
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", disable=not (cfg.progress and accelerator.is_local_main_process),
               dynamic_ncols=True)
    batches = _micro_batches(dl, sampler, epoch, micro, accelerator)
    t0 = time.perf_counter()
    steps_timed = 0
    last: dict = {}
    while step < cfg.max_steps:
        agg = {"loss": 0.0, "ce": 0.0, "roi": 0.0, "roi_frac": 0.0, "tokens": 0.0}
        for j in range(cfg.grad_accum):
            epoch, micro, batch = next(batches)
            sync = j == cfg.grad_accum - 1
            # Micro-batches before the last one accumulate locally (no gradient all-reduce).
            with accelerator.no_sync(lm) if not sync else _nullcontext():
                with accelerator.autocast():
                    res = lm(batch)
                    loss = res["loss"] / cfg.grad_accum
                accelerator.backward(loss)
            for key in agg:
                agg[key] += float(accelerator.reduce(res[key].detach().float(), "mean" if key != "tokens" else "sum")) / (
                    cfg.grad_accum if key != "tokens" else 1)
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            gnorm = float(accelerator.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm))
        else:
            gnorm = float("nan")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_timed += 1
        elapsed = time.perf_counter() - t0
        last = {"step": step, "epoch": epoch, **agg, "grad_norm": gnorm, "lr": scheduler.get_last_lr()[0],
                "samples_per_s": steps_timed * per_update / max(elapsed, 1e-9),
                "tokens_per_s": agg["tokens"] * steps_timed / max(elapsed, 1e-9), "elapsed_s": elapsed}
        bar.update(1)
        bar.set_postfix(loss=f"{agg['loss']:.3f}", ce=f"{agg['ce']:.3f}", roi=f"{agg['roi']:.3f}",
                        sps=f"{last['samples_per_s']:.1f}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics.write(last)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(accelerator, lm, optimizer, scheduler, out_dir=out, step=step, epoch=epoch, micro=micro,
                            seed=cfg.seed, run_meta=run_meta, keep=cfg.keep_checkpoints)
        if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.max_steps:
            bar.close()
            raise StopTraining(f"stop_after={cfg.stop_after}: stopped at step {step}")
    bar.close()
    final = out / "final"
    _save_final(accelerator, lm, final, run_meta)
    if cfg.report_to:
        accelerator.end_training()
    last["final_dir"] = str(final)
    return last


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _save_final(accelerator, lm, final: Path, run_meta: dict) -> None:
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    state = accelerator.unwrap_model(lm).trainable_state_dict()
    if accelerator.is_main_process:
        tmp = final.with_name(f".tmp-{final.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "run.json").write_text(json.dumps(run_meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- CLI glue


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--out", default="runs/sft", help="output directory (checkpoints, metrics, final weights)")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="GLOBAL micro-batch (split over processes)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-eps", type=float, default=1e-8,
                   help="AdamW epsilon (larger damps the normalised update of near-zero gradients)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only the final weights)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", default=None, help="'auto' (latest in --out) or a checkpoint directory")
    g.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # debug: simulate a crash
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto",
                   help="autocast: auto = bf16 on a GPU, none on the CPU")
    g.add_argument("--metrics", default="metrics.jsonl", help="metrics file name in --out (.jsonl or .csv)")
    g.add_argument("--report-to", default=None, help="accelerate tracker, e.g. tensorboard")
    g.add_argument("--no-progress", action="store_true")


def loop_config_from_args(a: argparse.Namespace) -> LoopConfig:
    return LoopConfig(out_dir=a.out, max_steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                      weight_decay=a.weight_decay, adam_eps=a.adam_eps, warmup_steps=a.warmup_steps, schedule=a.schedule,
                      max_grad_norm=a.max_grad_norm, seed=a.seed, log_every=a.log_every, save_every=a.save_every,
                      keep_checkpoints=a.keep_checkpoints, resume=a.resume, stop_after=a.stop_after,
                      mixed_precision=a.mixed_precision, metrics=a.metrics, report_to=a.report_to,
                      progress=not a.no_progress)
