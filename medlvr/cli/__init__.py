"""The ``medlvr`` command: one module per subcommand (medlvr/cli/<name>.py), listed in COMMANDS."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from medlvr.imageio.errors import MissingDependency


def default_threads() -> int | None:
    """The thread rule of every command that runs a model: None (leave torch's choice) when
    OMP_NUM_THREADS is set, else one thread per two cores. On a small shared CPU torch's
    default (every core, spinning OpenMP workers) is much slower than fewer threads when
    another process competes for the cores: the OpenMP barriers wait on descheduled workers."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 2) // 2)


def _threads(args: argparse.Namespace) -> None:
    if not hasattr(args, "threads"):  # a command that runs no model
        return
    n = args.threads if args.threads is not None else default_threads()
    if n:
        import torch

        torch.set_num_threads(n)


def _whole(what: str):
    """An argparse type: a whole number of ``what`` >= 1."""
    def parse(n: str) -> int:
        try:
            value = int(n)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a whole number of {what} >= 1, got {n!r}")
        return value
    return parse


_threads_arg = _whole("threads")
_pixels_arg = _whole("pixels")


def _prompt(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt (recorded in run.json; a run's own are the default of vlpo --init and eval)")
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="the system turn of every prompt; '' = none (default: the checkpoint's chat template "
                        "decides: Qwen2.5-VL adds 'You are a helpful assistant.', the embedded model none)")
    from medlvr.data.scoring import PROMPTS

    g.add_argument("--question-template", choices=tuple(PROMPTS), default=None,
                   help="the question's layout as a toolkit phrases it (medlvr/data/scoring/prompts.py, e.g. "
                        "medevalkit: 'Answer with the option's letter from the given choices directly.'); "
                        "default: medlvr's own")
    g.add_argument("--min-pixels", type=_pixels_arg, default=None,
                   help="resize smaller images up to this many pixels (default: the processor's)")
    g.add_argument("--max-pixels", type=_pixels_arg, default=None,
                   help="resize larger images down to this many pixels (default: the processor's; a checkpoint's "
                        "is capped at 1280*28*28 = 1,003,520, 1280 vision tokens)")


def run_name(spec: str) -> tuple[str, str]:
    """(name, path) of a ``[NAME=]DIR`` run argument: without a name, the run's folder (the
    parent of ``final/``), else the folder's own name."""
    from pathlib import Path

    name, _, path = spec.rpartition("=")
    return name or Path(path).parent.name or Path(path).name, path


def prompt_from_args(args: argparse.Namespace):
    """The PromptSettings the --system-prompt / --min-pixels / --max-pixels flags ask for (None
    where a flag is not given)."""
    from medlvr.policy import PromptSettings

    return PromptSettings(system_prompt=getattr(args, "system_prompt", None),
                          min_pixels=getattr(args, "min_pixels", None), max_pixels=getattr(args, "max_pixels", None),
                          question_template=getattr(args, "question_template", None))


def _window(p: argparse.ArgumentParser) -> None:
    from medlvr.imageio import window_arg

    p.add_argument("--window", type=window_arg, default=None,
                   help="windowing for DICOM/NIfTI/16-bit images without their own window and records naming "
                        "none: lung, mediastinum, abdomen, bone, brain or 'W/L' (e.g. 1500/-600)")


# (name, help, the shared flags it takes: --threads for every command that runs a model, --window
#  for those that read the user's images). Each command is the module medlvr/cli/<name>.py with
#  add_arguments(parser) and run(args) -> exit code, imported when the parser is built (light:
#  no model is built on import).
COMMANDS = [
    ("info", "versions, built backends and the device that will be used", ()),
    ("synth", "write the deterministic synthetic medical VQA set (JSONL + PNG)", ()),
    ("convert", "convert a benchmark's released files (SLAKE, VQA-RAD, PathVQA, OmniMedVQA, PMC-VQA, MMMU Health & "
                "Medicine, MedXpertQA-MM) to JSONL; bad entries are listed, not fatal (--strict)", ()),
    ("sft", "stage 1: ROI-supervised latent fine-tuning (accelerate; resumable)", ("threads", "window", "prompt")),
    ("vlpo", "stage 2: visual-latent policy optimisation from a stage-1 run", ("threads", "window", "prompt")),
    ("eval", "accuracy by benchmark and question type of trained runs; paired CIs, latent ablation; table + plot",
     ("threads", "window", "prompt")),
    ("report", "trained runs on several benchmarks: the paper's table (per benchmark, average, closed / open, "
               "modality), paired CIs; Markdown, CSV and a plot", ("threads", "window", "prompt")),
    ("plan", "per-GPU memory of both stages: DDP+LoRA, FSDP2 full fine-tuning, FSDP2+LoRA", ()),
    ("demo", "synthesise data; train SFT, stage 1, and from it VLPO, text-only VLPO and SFT; evaluate all with "
             "paired CIs", ("threads",)),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlvr", description="Latent visual reasoning for medical VQA: kernels and training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_, shared in COMMANDS:
        module = importlib.import_module(f"medlvr.cli.{name}")
        p = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(p)
        if "threads" in shared:
            p.add_argument("--threads", type=_threads_arg, default=None,
                           help="torch CPU threads (default: OMP_NUM_THREADS when set, else 1 per 2 cores: "
                                "on a small shared CPU all cores under contention are slower than half)")
        if "window" in shared:
            _window(p)
        if "prompt" in shared:
            _prompt(p)
        if name != "info":
            p.add_argument("--debug", action="store_true", default=None,
                           help="show the Python traceback of an error (also MEDLVR_DEBUG=1)")
        p.set_defaults(func=module.run, command=name)
    return parser


# What a user can cause and fix: bad data or records (DataError, ImageReadError and argument
# checks are ValueErrors), a path that is not there or not readable (OSError), an optional
# package that is not installed. These print one line; anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, OSError, MissingDependency)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", None)) or os.environ.get("MEDLVR_DEBUG", "0") not in ("", "0")
    try:
        _threads(args)
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"medlvr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medlvr {args.command}: interrupted", file=sys.stderr)
        return 130

