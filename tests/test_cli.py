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


def test_sft_bad_data_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "yes", "images": ["missing.png"]}\n')
    from medlvr.data.records import DataError

    argv = ["sft", "--data", str(bad), "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medlvr sft: error: ") and "images" in err, err
    with pytest.raises(DataError, match="images"):  # --debug keeps the traceback
        main(argv + ["--debug"])


def test_broken_jsonl_line_from_the_shell(tmp_path):
    """As a user meets it: a process, exit status 2, one line on stderr, no traceback."""
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "yes", "images": ["a.png"]\n')
    r = subprocess.run([sys.executable, "-m", "medlvr.cli", "sft", "--data", str(bad), "--out", str(tmp_path / "r"),
                        "--steps", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={k: v for k, v in __import__("os").environ.items() if k != "MEDLVR_DEBUG"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert r.stderr.startswith("medlvr sft: error: ") and "bad.jsonl:1" in r.stderr and "at at" not in r.stderr


def test_synth_dicom_without_pydicom_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # import pydicom -> ImportError
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--n", "4", "--format", "dicom"]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("medlvr synth: error: ") and "pip install 'pydicom" in err


def test_every_flag_has_help_and_fixed_values_are_choices():
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, f"flags without help: {missing}"
    for name in ("sft", "vlpo", "eval", "demo"):
        flags = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert {"--device", "--threads"} <= flags, f"{name}: {flags}"
    vlpo = {o: a for a in sub.choices["vlpo"]._actions for o in a.option_strings}
    for flag in ("--old-logprobs", "--rollout-backend"):
        if flag in vlpo:
            assert vlpo[flag].choices, f"vlpo {flag}: its values are a fixed set, list them as choices"


def test_thread_rule(monkeypatch):
    from medlvr.cli import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_threads() == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() is None  # the user's own setting stands


def test_progress_in_a_log_is_sparse_lines():
    import io

    from medlvr.progress import progress

    log = io.StringIO()
    bar = progress(total=500, desc="x", file=log, log_every=3600)
    for i in range(500):
        bar.set_postfix({"loss": i}, refresh=False)
        bar.update(1)
        if i == 250:  # a nested bar (an evaluation inside training): tqdm moves the cursor up
            inner = progress(range(3), desc="inner", file=log, log_every=3600)
            list(inner)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text, repr(text)
    lines = text.splitlines()
    assert 2 <= len(lines) <= 5 and lines[-1].startswith("x: 500/500"), lines


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


def test_progress_on_a_terminal_draws_on_the_given_stream():
    import io

    from medlvr.progress import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    list(progress(range(3), desc="t", file=term))
    assert "\r" in term.getvalue() and "t: 100%" in term.getvalue()  # tqdm's own redraws, on that stream
