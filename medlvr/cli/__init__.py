"""The ``medlvr`` command. Subcommands register themselves in ``build_parser``."""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import sys

from medlvr.imageio.errors import MissingDependency


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from medlvr import __version__
    from medlvr._backend import describe

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    b = describe()
    lines = [
        f"medlvr         {__version__}",
        f"python         {platform.python_version()} ({platform.machine()})",
        f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton         {version('triton')}",
        f"transformers   {version('transformers')}",
        f"accelerate     {version('accelerate')}",
        f"peft           {version('peft')}",
        "backends built:",
        f"  C++ (CPU)    {'yes' if b['extension_cpu'] else 'NO (medlvr._C missing: ops use the PyTorch reference)'}",
        f"  CUDA         {'yes, archs ' + b.get('extension_cuda_archs', '') if b['extension_cuda'] else 'no'}",
        f"  Triton       {'yes' if b['triton'] else 'no'}"
        + ("  (TRITON_INTERPRET=1: CPU interpreter)" if b["triton_interpret"] else ""),
        f"device         {b['device']}"
        + (f" ({torch.cuda.get_device_name()})" if b["cuda_available"] else f" ({torch.get_num_threads()} threads)"),
    ]
    print("\n".join(lines))
    return 0


def _sft(args: argparse.Namespace) -> int:
    from medlvr.train.sft.objective import stage1_main

    res = stage1_main(args)
    print(f"final weights: {res['final_dir']}  (loss {res['loss']:.4f}, ce {res['ce']:.4f}, roi {res['roi']:.4f})")
    return 0


def _vlpo(args: argparse.Namespace) -> int:
    from medlvr.cli.vlpo import vlpo_main

    res = vlpo_main(args)
    print(f"final weights: {res['final_dir']}")
    return 0


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


def _threads_arg(n: str) -> int:
    try:
        value = int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {n!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {n!r}")
    return value


def _window(p: argparse.ArgumentParser) -> None:
    from medlvr.imageio import window_arg

    p.add_argument("--window", type=window_arg, default=None,
                   help="windowing for DICOM/NIfTI/16-bit images without their own window and records naming "
                        "none: lung, mediastinum, abdomen, bone, brain or 'W/L' (e.g. 1500/-600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlvr", description="Latent visual reasoning for medical VQA: kernels and training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, built backends and the device that will be used")
    p.set_defaults(func=cmd_info, command="info")

    # Subcommand arguments are registered lazily-importing modules only for the chosen command
    # would need a two-pass parse; the imports below are light (no torch model is built).
    from medlvr.data.converters import add_convert_arguments, convert_main
    from medlvr.cli.demo import add_demo_arguments, demo_main
    from medlvr.cli.eval import add_eval_arguments, eval_main
    from medlvr.train.plan import add_plan_arguments, plan_main
    from medlvr.train.sft.objective import add_stage1_arguments
    from medlvr.data.synth import add_synth_arguments, synth_main
    from medlvr.cli.vlpo import add_vlpo_arguments

    # (name, help, add its arguments, run it, the shared flags it takes: --threads for every
    #  command that runs a model, --window for those that read the user's images)
    commands = [
        ("synth", "write the deterministic synthetic medical VQA set (JSONL + PNG)", add_synth_arguments, synth_main,
         ()),
        ("convert", "convert a published dataset layout (OmniMedVQA, VQA-RAD, SLAKE, PathVQA) to JSONL",
         add_convert_arguments, convert_main, ()),
        ("sft", "stage 1: ROI-supervised latent fine-tuning (accelerate; resumable)", add_stage1_arguments, _sft,
         ("threads", "window")),
        ("vlpo", "stage 2: visual-latent policy optimisation from a stage-1 run", add_vlpo_arguments, _vlpo,
         ("threads", "window")),
        ("eval", "accuracy by benchmark and question type of trained runs; paired CIs, latent ablation; table + plot",
         add_eval_arguments, eval_main, ("threads", "window")),
        ("plan", "per-GPU memory of both stages: DDP+LoRA, FSDP2 full fine-tuning, FSDP2+LoRA", add_plan_arguments,
         plan_main, ()),
        ("demo", "synthesise data; train SFT, stage 1, and from it VLPO, text-only VLPO and SFT; evaluate all with "
                 "paired CIs", add_demo_arguments, demo_main, ("threads",)),
    ]
    for name, help_, add_arguments, run, shared in commands:
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        if "threads" in shared:
            p.add_argument("--threads", type=_threads_arg, default=None,
                           help="torch CPU threads (default: OMP_NUM_THREADS when set, else 1 per 2 cores: "
                                "on a small shared CPU all cores under contention are slower than half)")
        if "window" in shared:
            _window(p)
        p.add_argument("--debug", action="store_true", default=None,
                       help="show the Python traceback of an error (also MEDLVR_DEBUG=1)")
        p.set_defaults(func=run, command=name)
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

