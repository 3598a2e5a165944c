"""``medlvr report`` end to end on the benchmarks' fixture sets (tests/data/fixtures/: real
entries of SLAKE, VQA-RAD and OmniMedVQA, converted by ``medlvr convert``) with two small runs."""
import pytest

from _threads import one_thread  # noqa: F401  (autouse fixture)
from medlvr.cli import main
from medlvr.data.records import load_jsonl
from medlvr.data.synth import synthesize
from medlvr.models import build_default
from medlvr.policy import build_trainable
from medlvr.train.loop import LoopConfig
from medlvr.train.sft import Stage1Config, train_stage1

FIXTURES = ("slake", "vqa_rad", "omnimedvqa")


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "data" / "fixtures"
    out = tmp_path_factory.mktemp("bench")
    for name in FIXTURES:
        assert main(["convert", name.replace("_", "-"), "--root", str(root / name), "--out", str(out / f"{name}.jsonl")]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    records = load_jsonl(synthesize(d / "data", n=8, seed=0, split_fractions=(1.0, 0.0, 0.0))["train"])[0]
    finals = {}
    for name, k in (("sft", 0), ("latent", 2)):
        model, processor = build_default(seed=0)
        lm = build_trainable(model, processor, Stage1Config(k_latent=k))
        finals[name] = train_stage1(lm, processor, records, LoopConfig(out_dir=str(d / name), max_steps=1, batch_size=4,
                                                                       progress=False))["final_dir"]
    return finals


def test_report_writes_the_papers_table(benches, runs, tmp_path, capsys):
    argv = ["report", "--split", "", "--max-new-tokens", "4", "--bootstrap", "100", "--out", str(tmp_path)]
    for name, path in runs.items():
        argv += ["--run", f"{name}={path}"]
    for name in FIXTURES:
        argv += ["--bench", f"{name}={benches / (name + '.jsonl')}"]
    assert main(argv) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| run | slake | vqa_rad | omnimedvqa | average |" in md
    assert "omnimedvqa by modality" in md and "Closed / open" in md
    assert "Against sft: paired difference" in md and "| latent |" in md
    assert "protocol `medevalkit`" in md and "max_pixels" in md
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert any(row.startswith("latent,vqa_rad,answer_type=closed,") for row in csv)
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "average" in capsys.readouterr().out
