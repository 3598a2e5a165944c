"""The training loop of both stages ("one loop, two objectives"): accelerate (CPU, one GPU,
DDP or FSDP from an accelerate config), AdamW + warmup/cosine schedule, gradient clipping,
autocast, metrics, progress bar, atomic checkpoints, exact resume, the final run folder.

A stage plugs in an :class:`Objective`: the module whose forward carries the gradient and one
training step. Stage 1 (medlvr/train/sft/objective.py, ``SFTObjective``) accumulates
``--grad-accum`` micro-batches per optimizer update; stage 2 (medlvr/train/vlpo/objective.py,
``VLPOObjective``) samples rollouts and makes ``ppo_epochs`` updates per step. Both reach the
weights only through the :class:`Updater` the loop hands them (autocast, backward,
``update``: clip, optimizer step, schedule, zero grad), so accelerate's gradient sync, mixed
precision and clipping are the same for both.

Checkpoints and the final weights are run folders (medlvr/policy/run_dir.py); ``--resume auto``
(or a checkpoint dir) restores weights, optimizer, schedule, RNG and the objective's data
position and continues exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from medlvr.flags import add_config_arguments, opt
from medlvr.devices import DEVICES, MIXED_PRECISION, check_device, resolve_mixed_precision, trains_on_gpu
from medlvr.policy.run_dir import RunDir
from medlvr.train.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class LoopConfig:
    """Settings of the shared loop; each field's metadata makes its flag (medlvr/flags.py,
    which appends each default to the help). Stage 2 holds one (``VLPOConfig.loop``, with its
    own defaults) and exposes a few of these flags."""
    out_dir: str = opt("runs/sft", "output directory (checkpoints, metrics, final weights)", flag="--out")
    max_steps: int = opt(100, "training steps (stage 1: an optimizer update each; VLPO: rollouts, then --ppo-epochs "
                                  "updates)", flag="--steps")
    batch_size: int = opt(8, "GLOBAL micro-batch, split over processes")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-4, "peak AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay of the matrices; biases and norms get none")
    adam_eps: float = opt(1e-8, "AdamW epsilon (larger damps the normalised update of near-zero gradients)")
    warmup_steps: int = opt(0, "linear warm-up steps before the schedule")
    schedule: str = opt("cosine", "learning-rate decay after warm-up (cosine and linear reach 0 at --steps)",
                        choices=SCHEDULES)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = opt(0, "seed of the model init (default model, new LoRA), data order, sampling and latent noise")
    log_every: int = opt(1, "write a metrics row every N steps")
    save_every: int = opt(0, "checkpoint every N steps (0: only the final weights)")
    keep_checkpoints: int = opt(2, "checkpoints kept in --out, newest first")
    resume: str | None = opt(None, "'auto' (latest in --out) or a checkpoint directory")
    # stops the run as a crash would, so tests can check that --resume continues exactly
    stop_after: int | None = opt(None, "stop after N steps without the final weights", debug=True)
    mixed_precision: str = opt("auto", "autocast: auto = bf16 on a GPU, none on the CPU", choices=MIXED_PRECISION)
    device: str = opt("auto", "auto = one GPU per process when there are enough, else the CPU",
                      choices=DEVICES)
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state over the processes (FSDP2, one unit per "
                            "decoder layer and vision block; see docs/distributed.md)")
    metrics: str = opt("metrics.jsonl", "metrics file name in --out (.jsonl or .csv)")
    report_to: str | None = opt(None, "accelerate tracker, e.g. tensorboard")
    progress: bool = opt(True, "no progress bar", flag="--no-progress")

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps (--steps): expected >= 1, got {self.max_steps}")
        if not self.lr > 0 or self.max_grad_norm < 0:
            raise ValueError(f"lr / max_grad_norm: expected > 0 / >= 0, got {self.lr} / {self.max_grad_norm}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size / grad_accum: expected >= 1, got {self.batch_size} / {self.grad_accum}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: expected one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        check_device(self.device)
        if self.report_to == "tensorboard":
            import importlib.util

            if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
                raise ValueError("report_to: 'tensorboard' needs the tensorboard (or tensorboardX) package, "
                                 "which is not installed; pip install tensorboard, or drop --report-to")
        if Path(self.metrics).suffix not in (".jsonl", ".csv"):
            raise ValueError(f"metrics: expected a .jsonl or .csv file name, got {self.metrics!r}")


class StopTraining(RuntimeError):
    """Raised by ``stop_after`` (a debug switch that simulates a crash for the resume test)."""


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


def make_accelerator(mixed_precision: str = "auto", device: str = "auto", **kwargs):
    """The one place medlvr builds an ``accelerate.Accelerator`` (stage 1, VLPO, the demo).

    cpu=True without a GPU per rank (:func:`gpu_per_rank`): accelerate then forms a gloo
    process group (MULTI_CPU) for torchrun-launched processes; without it each CPU rank
    would train alone."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized

    mode = resolve_mixed_precision(mixed_precision, device)
    state = AcceleratorState() if is_initialized() else None  # a process-wide singleton
    if state is not None and state.num_processes == 1 and state.mixed_precision != mode:
        # accelerate refuses a second Accelerator with another precision in one process
        # (its state is global). One process is free to run stage 1 in bf16 and evaluate in
        # fp32, so the state is re-made; launched multi-process runs keep the rule.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=not trains_on_gpu(device), mixed_precision=mode, **kwargs)


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """One row per logged step to JSONL or CSV (main process; no file when path is None), and
    to accelerate's trackers."""

    def __init__(self, path: Path | None, accelerator, *, append: bool):
        self.path, self.acc = (Path(path) if path is not None else None), accelerator
        self.csv = self.path is not None and self.path.suffix == ".csv"
        self._fields: list[str] | None = None
        if accelerator.is_main_process and not append and self.path is not None and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        if self.acc.is_main_process and self.path is not None:
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


class Updater:
    """What an objective may do to the weights during its step.

    module: the (prepared) module whose forward carries the gradient; optimizer: its
    optimizer. Under accelerate (``accelerator``) backward, clipping and autocast are
    accelerate's; without one (a bare :func:`medlvr.train.vlpo.step.vlpo_step` call) they are
    plain torch. ``update()`` is one optimizer update: clip to ``max_grad_norm`` (0: off),
    step, advance the schedule, zero the gradients; it returns the pre-clip gradient norm
    (None when clipping is off)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, accelerator: Any = None,
                 scheduler: Any = None, max_grad_norm: float = 0.0):
        self.module, self.optimizer, self.accelerator = module, optimizer, accelerator
        self.scheduler, self.max_grad_norm = scheduler, max_grad_norm

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def accumulating(self, sync: bool = True) -> contextlib.AbstractContextManager:
        """Around the forward and backward of a micro-batch that is not the last one before an
        update: gradients accumulate locally, without DDP's all-reduce."""
        if sync or self.accelerator is None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def reduce(self, value: torch.Tensor, op: str = "mean") -> float:
        """A metric averaged (or summed) over the processes."""
        return float(self.accelerator.reduce(value, op) if self.accelerator is not None else value)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]

    def update(self) -> float | None:
        norm = None
        if self.max_grad_norm and self.max_grad_norm > 0:
            if self.accelerator is not None:
                norm = float(self.accelerator.clip_grad_norm_(self.module.parameters(), self.max_grad_norm))
            else:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


class Objective(Protocol):
    """What a stage plugs into :func:`train_loop`.

    module: the module whose forward carries the gradient (accelerate prepares it: DDP / FSDP
    hook its forward); its parameters with requires_grad are optimised.
    start(updater): after preparation, before the first step (prepare data, build
    references, seed per-rank streams). step(updater, step) -> the metrics row of step
    ``step`` (0-based count of steps done before it). postfix(row): the progress bar's fields.
    position() -> the data position to checkpoint (None: the objective cannot resume);
    seek(state): restore it from a checkpoint's state.json."""
    module: torch.nn.Module

    def start(self, updater: Updater) -> None: ...
    def step(self, updater: Updater, step: int) -> dict: ...
    def postfix(self, row: dict) -> dict: ...
    def position(self) -> dict | None: ...
    def seek(self, state: dict) -> None: ...


def _prepare(objective: Objective, cfg: LoopConfig, accelerator: Any):
    """The objective's module (sharded first with ``cfg.fsdp``), AdamW over its trainable
    parameters (no weight decay on vectors: norms, biases), the schedule and the Updater,
    all through ``accelerator.prepare``."""
    if cfg.fsdp:  # shard before the optimizer is built: it must hold the shards (medlvr/policy/fsdp.py)
        if not getattr(objective, "supports_fsdp", False):
            raise ValueError(f"fsdp: {type(objective).__name__} does not run sharded; drop --fsdp")
        if accelerator.distributed_type == "FSDP":  # accelerate's own FSDP (a config with fsdp_config)
            raise ValueError("fsdp: --fsdp shards the model itself; launch with a plain multi-GPU accelerate config "
                             "(no fsdp_config section, docs/distributed.md), or drop --fsdp to use accelerate's")
        from medlvr.policy.fsdp import shard

        shard(objective.module, device=accelerator.device, mixed_precision=accelerator.mixed_precision)
    params = [p for p in objective.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected trainable parameters (requires_grad), found none")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, eps=cfg.adam_eps)
    scheduler = make_scheduler(optimizer, cfg)
    if cfg.fsdp:  # sharded already: accelerate must not wrap it in DDP as well
        module = objective.module
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        module, optimizer, scheduler = accelerator.prepare(objective.module, optimizer, scheduler)
    updater = Updater(module, optimizer, accelerator=accelerator, scheduler=scheduler, max_grad_norm=cfg.max_grad_norm)
    return module, optimizer, scheduler, updater


def train_loop(objective: Objective, cfg: LoopConfig, *, accelerator: Any = None, desc: str = "train",
               meta: dict | None = None, metrics_path: str | Path | None = "", append_metrics: bool = False) -> dict:
    """Run ``cfg.max_steps`` steps of ``objective``; returns the last step's metrics row, plus
    ``final_dir`` when ``meta`` is given (the run folder <out>/final: meta as run.json and the
    module's trainable weights). metrics_path: the metrics file ("" = <out>/<cfg.metrics>;
    None = none); append_metrics keeps an existing file's rows (a resume always does)."""
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from medlvr.progress import progress

    out = Path(cfg.out_dir)
    if accelerator is None:
        accelerator = make_accelerator(cfg.mixed_precision, device=cfg.device, log_with=cfg.report_to,
                                       project_dir=str(out),
                                       dataloader_config=DataLoaderConfiguration(split_batches=True))
    set_seed(cfg.seed)
    if metrics_path == "":
        metrics_path = out / cfg.metrics
    if accelerator.is_main_process and (meta is not None or cfg.save_every):
        out.mkdir(parents=True, exist_ok=True)

    module, optimizer, scheduler, updater = _prepare(objective, cfg, accelerator)
    objective.start(updater)
    if (cfg.save_every or cfg.resume) and objective.position() is None:
        raise ValueError(f"save_every / resume: {type(objective).__name__} cannot checkpoint its data position")

    step = 0
    ckpt = find_checkpoint(cfg.resume, out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(accelerator, module, optimizer, scheduler, ckpt)
        step = state["step"]
        objective.seek(state)
        accelerator.print(f"resumed from {ckpt} at step {step} ({objective.position()})")
    if cfg.report_to:
        accelerator.init_trackers(out.name, config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
    metrics = MetricsWriter(metrics_path, accelerator, append=append_metrics or ckpt is not None)

    bar = progress(total=cfg.max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    last: dict = {}
    try:
        while step < cfg.max_steps:
            last = objective.step(updater, step)
            step += 1
            bar.set_postfix(objective.postfix(last), refresh=False)  # shown by the update's own frame
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics.write(last)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                save_checkpoint(accelerator, module, optimizer, scheduler, out_dir=out, step=step,
                                position=objective.position(), seed=cfg.seed, meta=meta or {}, keep=cfg.keep_checkpoints)
            if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.max_steps:
                raise StopTraining(f"stop_after={cfg.stop_after}: stopped at step {step}")
    finally:
        bar.close()
    last = dict(last)
    if meta is not None:
        last["final_dir"] = str(RunDir(out / "final").save(module, meta, accelerator=accelerator, export_hf=True).path)
    if cfg.report_to:
        accelerator.end_training()
    return last

# ----------------------------------------------------------------------------- CLI glue


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p.add_argument_group("training loop"), LoopConfig, show_default=True)
