"""The install as a user meets it: nothing in the repo root hides a dependency's package,
setup.py finds the CUDA toolkit only where nvcc and libcudart really are, and the lock
pins what README says it pins."""
import importlib.metadata as md
import importlib.util
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code_or_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _root_names() -> set[str]:
    """What ``import NAME`` finds in the repo root when the root is on sys.path (python -m, pytest)."""
    names = {p.stem for p in ROOT.glob("*.py")}
    names |= {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names


def test_no_root_name_shadows_an_installed_distribution():
    # transformers >= 5.25 imports Hugging Face's `kernels`; a root package of that name hid it.
    owners = md.packages_distributions()
    clashes = {n: owners[n] for n in _root_names() if n in owners and set(owners[n]) != {"medlvr"}}
    assert not clashes, f"repo-root names that hide installed packages: {clashes}"
    assert "kernels" not in _root_names()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_transformers_and_cli_import_from_any_directory(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    r = _run(["-c", "import transformers.modeling_utils, medlvr, importlib.util as u; "
                    "s = u.find_spec('kernels'); print(s.origin if s else None)"], cwd)
    assert r.returncode == 0, r.stderr
    origin = r.stdout.strip().splitlines()[-1]
    if origin != "None":  # Hugging Face's kernels (transformers >= 5.25 requires it), never the repo's
        assert "site-packages" in Path(origin).parts or "dist-packages" in Path(origin).parts, origin
    r = _run(["-m", "medlvr.cli", "--help"], cwd)
    assert r.returncode == 0 and "synth" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- setup.py

def _setup_module():
    spec = importlib.util.spec_from_file_location("medlvr_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only: setup() runs under __main__
    return mod


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _toolkit(root: Path, *, cudart: bool = True) -> Path:
    """A fake toolkit whose nvcc names its root in a dry run, as NVIDIA's does (``#$ TOP=``)."""
    _script(root / "bin" / "nvcc", f'echo "#\\$ TOP={root}/bin/.." >&2')
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("")
    return root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    return monkeypatch


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(clean_env, tmp_path):
    # /usr/local/bin/nvcc as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: torch's guess from
    # the wrapper's folder is /usr/local, where the link fails with -lcudart.
    real = _toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "wrap" / "bin" / "nvcc", f'exec {real}/bin/nvcc "$@"')
    clean_env.setenv("PATH", str(tmp_path / "wrap" / "bin"))
    home, where = _setup_module().find_cuda_home(fallback=tmp_path / "none")
    assert home == real.resolve() and "nvcc on PATH" in where


def test_setup_skips_an_incomplete_toolkit(clean_env, tmp_path):
    broken = _toolkit(tmp_path / "cuda-broken", cudart=False)
    clean_env.setenv("CUDA_HOME", str(broken))
    home, why = _setup_module().find_cuda_home(fallback=tmp_path / "none")
    assert home is None and "libcudart" in why and str(broken) in why
    good = _toolkit(tmp_path / "cuda-good")
    clean_env.setenv("CUDA_PATH", str(good))
    assert _setup_module().find_cuda_home(fallback=tmp_path / "none")[0] == good


def test_setup_without_any_toolkit(clean_env, tmp_path):
    home, why = _setup_module().find_cuda_home(fallback=tmp_path / "none")
    assert home is None and why.startswith("no CUDA toolkit found")


# ----------------------------------------------------------------------------- the lock

LOCKED = ("torch", "triton", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "pydicom",
          "nibabel", "numpy", "pillow", "trl")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_lock_pins_what_readme_names():
    pins = _lock()
    missing = [p for p in LOCKED if p not in pins]
    assert not missing, f"requirements-lock.txt does not pin {missing}"
    readme = (ROOT / "README.md").read_text()
    for p in ("torch", "transformers", "triton", "peft", "accelerate"):
        assert f"{p} {pins[p]}" in readme or f"{p}=={pins[p]}" in readme, f"README does not name the locked {p}"


def test_lock_is_what_is_installed_when_installed_from_it():
    """`make test` installs from the lock; a different version here means the lock is stale.
    Skipped (with the versions) in an environment that was deliberately not installed from it
    (`make test-latest`, LOCK= unset)."""
    if os.environ.get("MEDLVR_UNLOCKED"):
        pytest.skip("MEDLVR_UNLOCKED: installed from the ranges in pyproject.toml, not the lock")
    pins = _lock()
    off = {}
    for p in LOCKED:
        try:
            have = md.version(p)
        except md.PackageNotFoundError:
            continue
        if have.split("+")[0] != pins[p].split("+")[0]:
            off[p] = (have, pins[p])
    assert not off, f"installed != locked (installed, locked): {off}"
