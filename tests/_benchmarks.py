"""Load a script of benchmarks/ as a module (they are scripts, not a package) and read the
CSV tables they write: the smoke tests of the benchmarks share these two steps."""
import csv
import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """benchmarks/<name>.py as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def csv_rows(folder: Path, pattern: str) -> list[dict]:
    """The rows of the one CSV in ``folder`` matching ``pattern``."""
    (path,) = Path(folder).glob(pattern)
    with open(path) as f:
        return list(csv.DictReader(f))
