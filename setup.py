"""Build of medlvr: the Python package (Triton kernels in medlvr/kernels/) and
the compiled extension medlvr._C from csrc/.

Build switches (environment variables, as flash-attention does):
  MEDLVR_FORCE_CUDA=1   build the CUDA kernels even when no nvcc/CUDA torch is detected
  MEDLVR_SKIP_CUDA=1    build only the C++ CPU kernels
  MEDLVR_SKIP_EXT=1     build no extension at all (pure Python; ops use references/Triton)
  TORCH_CUDA_ARCH_LIST  CUDA architectures, default "8.0;9.0" (A100, H100)
  MAX_JOBS              parallel compile jobs (ninja)
  CUDA_HOME / CUDA_PATH the CUDA toolkit, when it is not the one behind `nvcc` or /usr/local/cuda
The CUDA kernels are built when torch is a CUDA build and a complete toolkit (nvcc, the
runtime headers and libcudart together) is found; otherwise the C++ kernels alone, with one
line saying why. `pip install .` works; `pip install --no-build-isolation .` builds against
the torch already installed instead of a fresh one in an isolated environment.
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _toolkit_complete(home: Path) -> bool:
    """nvcc, the runtime headers and the cudart library together: what the link needs."""
    libs = [home / d / "libcudart.so" for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")]
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file() and any(
        lib.exists() for lib in libs)


def _nvcc_top() -> Path | None:
    """The toolkit that the ``nvcc`` on PATH really runs. ``nvcc`` may be a wrapper script
    (``exec /usr/local/cuda-13.0/bin/nvcc``) whose folder is no toolkit: torch's own guess,
    dirname(dirname(which nvcc)), then points at /usr/local and the link fails with
    ``-lcudart``. nvcc's dry run prints the toolkit root it uses (``#$ TOP=...``)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(os.path.realpath(nvcc)).parent.parent


def find_cuda_home(fallback: Path = Path("/usr/local/cuda")) -> tuple[Path | None, str]:
    """(toolkit root, where it was found) where nvcc and cudart are found together, else
    (None, why not). Looked for in CUDA_HOME, CUDA_PATH, the toolkit behind ``nvcc`` on PATH,
    then ``fallback``."""
    tried = [(Path(os.environ[name]), name) for name in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(name)]
    top = _nvcc_top()
    if top is not None:
        tried.append((top, "nvcc on PATH"))
    tried.append((fallback, "the default location"))
    for home, where in tried:
        if _toolkit_complete(home):
            return home, f"{home} (from {where})"
    if len(tried) == 1 and not fallback.exists():
        return None, "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)"
    return None, "no complete CUDA toolkit (nvcc + cuda_runtime.h + libcudart together) in " + ", ".join(
        f"{h} ({w})" for h, w in tried)


def extensions():
    if flag("MEDLVR_SKIP_EXT"):
        return [], {}
    import torch

    cuda_home, why = (None, "MEDLVR_SKIP_CUDA=1") if flag("MEDLVR_SKIP_CUDA") else find_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first.
        os.environ["CUDA_HOME"] = str(cuda_home)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    with_cuda = flag("MEDLVR_FORCE_CUDA") or (torch.version.cuda is not None and cuda_home is not None)
    if torch.version.cuda is None and not flag("MEDLVR_FORCE_CUDA"):
        why = f"torch {torch.__version__} is a CPU build"
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++20 from torch 2.10).
    # -fopenmp-simd: honour `#pragma omp simd` reductions without an OpenMP runtime;
    # -fno-trapping-math: lets GCC if-convert the float selects in the hot loops (with
    # trapping math on it keeps them as branches and vectorises nothing). medlvr never
    # reads floating-point exception flags.
    cxx = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
    if not with_cuda:
        print(f"medlvr: building the C++ CPU kernels only: {why}", flush=True)
        ext = CppExtension("medlvr._C", cpp, extra_compile_args={"cxx": cxx})
        return [ext], {"build_ext": BuildExtension}
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"medlvr: building C++ and CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} with {why}", flush=True)
    # The arch list travels as one preprocessor token ("8.0;9.0" -> sm80_90): quotes and
    # semicolons do not survive the shell that ninja runs the compilers in.
    token = "sm" + "_".join("".join(ch for ch in a if ch.isalnum()) for a in archs.replace(";", " ").split())
    macros = ["-DMEDLVR_WITH_CUDA", f"-DMEDLVR_CUDA_ARCHS={token}"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", *macros]
    ext = CUDAExtension("medlvr._C", cpp + cu, extra_compile_args={"cxx": cxx + macros, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def main() -> None:
    ext_modules, cmdclass = extensions()
    setup(
        # Namespace discovery so the data folders (medlvr/models/assets) are packages too:
        # setuptools warns about package data in a folder it does not know as a package.
        packages=find_namespace_packages(include=["medlvr", "medlvr.*"], exclude=["*.__pycache__"]),
        package_data={"medlvr.models": ["assets/*", "assets/**/*"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


# setuptools' build backend runs this file as __main__; tests load it to check find_cuda_home.
if __name__ == "__main__":
    main()
