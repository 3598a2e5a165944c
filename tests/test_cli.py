"""The `medlvr` command: subcommands exist, and synth -> sft -> eval runs end to end; the
demo's --quick variant produces its table, plot and summary."""
import json

import pytest
import torch

from medlvr.cli import build_parser, main


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the CLI's --threads / the demo set it process-wide


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("info", "synth", "convert", "sft", "vlpo", "eval", "demo"):
        assert cmd in out
    for cmd in ("sft", "eval", "demo", "vlpo"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])


def test_synth_sft_eval(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--n", "12", "--image-size", "56", "--split", "0.75", "0", "0.25"]) == 0
    run = tmp_path / "run"
    assert main(["sft", "--data", str(data / "train.jsonl"), "--out", str(run), "--k-latent", "2", "--steps", "2",
                 "--batch-size", "3", "--metrics", "metrics.csv", "--no-progress", "--threads", "1"]) == 0
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,loss,ce,roi") and len(lines) == 3
    assert (run / "final" / "model.safetensors").is_file()
    ev = tmp_path / "eval"
    assert main(["eval", "--run", f"s1={run / 'final'}", "--data", str(data / "test.jsonl"), "--out", str(ev),
                 "--max-new-tokens", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "s1" in out
    acc = json.loads((ev / "accuracy.json").read_text())
    assert acc["s1"]["n"] == 3 and (ev / "accuracy.png").is_file()


def test_sft_bad_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "yes", "images": ["missing.png"]}\n')
    from medlvr.train.data import DataError

    with pytest.raises(DataError, match="images"):
        main(["sft", "--data", str(bad), "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"])


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(a) SFT" in out and "(b) stage 1" in out and "(c) stage 1+2" in out and "ordering" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"(a) SFT", "(b) stage 1", "(c) stage 1+2"} <= set(summary["accuracy"])
    assert (tmp_path / "accuracy.png").is_file()
    for run in ("a_sft", "b_stage1", "c_vlpo"):
        assert (tmp_path / run / "final" / "model.safetensors").is_file()
