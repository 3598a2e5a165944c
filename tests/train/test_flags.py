"""Flags generated from the config dataclasses (medlvr/train/flags.py): a command line reaches
every field it names, and what it does not name keeps the dataclass default."""
import argparse
import dataclasses

from medlvr.cli import build_parser
from medlvr.train.flags import add_config_arguments, config_from_args, opt
from medlvr.train.loop import LoopConfig
from medlvr.train.stage1 import Stage1Config
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
    args = build_parser().parse_args(["vlpo", "--data", "x.jsonl", "--no-fused-loss", "--no-latent-norm", "--lr", "0.01",
                                      "--old-logprobs", "rollout", "--n-rollouts", "3"])
    cfg = config_from_args(VLPOConfig, args, k_latent=5)
    assert cfg == dataclasses.replace(d, k_latent=5, fused_loss=False, latent_norm=False, lr=0.01,
                                      old_logprobs="rollout", n_rollouts=3)
    plain = build_parser().parse_args(["vlpo", "--data", "x.jsonl"])
    assert config_from_args(VLPOConfig, plain, k_latent=d.k_latent) == d


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
