"""Flags generated from the config dataclasses (medlvr/flags.py): a command line reaches
every field it names, and what it does not name keeps the dataclass default."""
import argparse
import dataclasses

import pytest

from medlvr.cli import build_parser
from medlvr.flags import add_config_arguments, config_from_args, nested, opt
from medlvr.train.loop import LoopConfig
from medlvr.train.sft import Stage1Config
from medlvr.train.vlpo import VLPOConfig


def test_sft_command_line_builds_both_configs():
    argv = ["sft", "--data", "x.jsonl", "--k-latent", "2", "--mode", "teacher-forced", "--roi-weight", "0.5",
            "--roi-loss", "mse", "--roi-pooling", "bilinear", "--projector", "--lora", "--lora-r", "4",
            "--lora-alpha", "8", "--out", "o", "--steps", "7", "--batch-size", "3", "--grad-accum", "2", "--lr", "0.1",
            "--weight-decay", "0.01", "--adam-eps", "1e-6", "--warmup-steps", "1", "--schedule", "linear",
            "--max-grad-norm", "0.5", "--seed", "9", "--log-every", "2", "--save-every", "3", "--keep-checkpoints", "1",
            "--resume", "auto", "--stop-after", "4", "--mixed-precision", "no", "--device", "cpu", "--fsdp",
            "--metrics", "m.csv", "--no-progress"]
    args = build_parser().parse_args(argv)
    assert config_from_args(Stage1Config, args) == Stage1Config(
        k_latent=2, mode="teacher-forced", roi_weight=0.5, roi_loss="mse", roi_pooling="bilinear", projector=True,
        lora=True, lora_r=4, lora_alpha=8)
    assert config_from_args(LoopConfig, args) == LoopConfig(
        out_dir="o", max_steps=7, batch_size=3, grad_accum=2, lr=0.1, weight_decay=0.01, adam_eps=1e-6,
        warmup_steps=1, schedule="linear", max_grad_norm=0.5, seed=9, log_every=2, save_every=3, keep_checkpoints=1,
        resume="auto", stop_after=4, mixed_precision="no", device="cpu", fsdp=True, metrics="m.csv", progress=False)
    plain = build_parser().parse_args(["sft", "--data", "x.jsonl"])
    assert config_from_args(LoopConfig, plain) == LoopConfig()
    assert config_from_args(Stage1Config, plain) == Stage1Config()


def test_vlpo_command_line_builds_its_config():
    d = VLPOConfig()
    args = build_parser().parse_args(["vlpo", "--data", "x.jsonl", "--no-latent-norm", "--lr", "0.01",
                                      "--old-logprobs", "rollout", "--n-rollouts", "3"])
    cfg = config_from_args(VLPOConfig, args, k_latent=5)
    assert cfg == dataclasses.replace(d, k_latent=5, latent_norm=False, loop=dataclasses.replace(d.loop, lr=0.01),
                                      old_logprobs="rollout", n_rollouts=3)
    plain = build_parser().parse_args(["vlpo", "--data", "x.jsonl"])
    assert config_from_args(VLPOConfig, plain, k_latent=d.k_latent) == d


def test_vlpo_config_holds_the_loop_config_and_keeps_its_flags():
    """VLPOConfig's loop settings are LoopConfig's fields (declared once), and ``medlvr vlpo``
    keeps their flag names and its own defaults for them."""
    from medlvr.train.vlpo import vlpo_loop

    own = {f.name for f in dataclasses.fields(VLPOConfig)}
    assert not own & {"lr", "steps", "seed", "max_grad_norm"} and isinstance(VLPOConfig().loop, LoopConfig)
    argv = ["vlpo", "--data", "x.jsonl", "--out", "o", "--steps", "7", "--lr", "0.01", "--seed", "9",
            "--max-grad-norm", "0.5", "--mixed-precision", "no", "--device", "cpu", "--fsdp", "--no-progress"]
    cfg = config_from_args(VLPOConfig, build_parser().parse_args(argv), k_latent=8)
    assert cfg.loop == vlpo_loop(out_dir="o", max_steps=7, lr=0.01, seed=9, max_grad_norm=0.5, mixed_precision="no",
                                 device="cpu", fsdp=True, progress=False)
    plain = vars(build_parser().parse_args(["vlpo", "--data", "x.jsonl"]))
    want = dict(out="runs/vlpo", steps=100, lr=1e-6, seed=0, max_grad_norm=1.0, mixed_precision="auto",
                device="auto", fsdp=False, no_progress=False)
    assert {k: plain[k] for k in want} == want
    assert VLPOConfig().loop.schedule == "constant"
    with pytest.raises(ValueError, match="lr / max_grad_norm: expected > 0 / >= 0, got 0 / 1.0"):
        vlpo_loop(lr=0)  # the loop's check, for both stages
    with pytest.raises(ValueError, match=r"max_steps \(--steps\): expected >= 1, got 0"):
        config_from_args(VLPOConfig, build_parser().parse_args(["vlpo", "--data", "x", "--steps", "0"]), k_latent=8)


def test_nested_config_flags():
    @dataclasses.dataclass
    class Inner:
        rate: float = opt(0.5, "a rate")
        quiet: bool = opt(True, "no output", flag="--no-out")
        hidden: int = opt(3, "not exposed")

    @dataclasses.dataclass
    class Outer:
        k: int = opt(1, "k")
        inner: Inner = nested(lambda: Inner(rate=0.25), ("rate", "quiet"))

    p = argparse.ArgumentParser()
    add_config_arguments(p, Outer, show_default=True)
    actions = {a.dest: a for a in p._actions}
    assert "hidden" not in actions and actions["rate"].default == 0.25
    assert actions["rate"].help == "a rate (default 0.25)"
    assert config_from_args(Outer, p.parse_args([])) == Outer(inner=Inner(rate=0.25))
    got = config_from_args(Outer, p.parse_args(["--rate", "2", "--no-out", "--k", "4"]))
    assert got == Outer(k=4, inner=Inner(rate=2.0, quiet=False))
    assert config_from_args(Outer, p.parse_args([]), inner=Inner()).inner == Inner()  # an override wins


def test_field_metadata_kinds():
    @dataclasses.dataclass
    class Cfg:
        size: int = opt(2, "a size", flag="--n")
        kind: str = opt("a", "a kind", choices=("a", "b"))
        on: bool = opt(False, "a switch")
        shown: bool = opt(True, "no bar", flag="--no-bar")
        both: bool = opt(True, "both ways")
        maybe: float | None = opt(None, "optional")
        hidden: int = opt(0, "debug only", debug=True)
        internal: float = opt(0.5, None)

    p = argparse.ArgumentParser()
    add_config_arguments(p, Cfg)
    actions = {a.dest: a for a in p._actions}
    assert "internal" not in actions and actions["hidden"].help == argparse.SUPPRESS
    assert actions["kind"].choices == ("a", "b")
    assert Cfg() == config_from_args(Cfg, p.parse_args([]))
    got = config_from_args(Cfg, p.parse_args(["--n", "3", "--kind", "b", "--on", "--no-bar", "--no-both",
                                             "--maybe", "1.5", "--hidden", "1"]))
    assert got == Cfg(size=3, kind="b", on=True, shown=False, both=False, maybe=1.5, hidden=1)
    assert config_from_args(Cfg, p.parse_args([]), size=7).size == 7  # an override wins over the flag
