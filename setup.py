"""Build of medlvr: the Python package, the Triton kernels (kernels/ -> medlvr.kernels) and
the compiled extension medlvr._C from csrc/.

Build switches (environment variables, as flash-attention does):
  MEDLVR_FORCE_CUDA=1   build the CUDA kernels even when no nvcc/CUDA torch is detected
  MEDLVR_SKIP_CUDA=1    build only the C++ CPU kernels
  MEDLVR_SKIP_EXT=1     build no extension at all (pure Python; ops use references/Triton)
  TORCH_CUDA_ARCH_LIST  CUDA architectures, default "8.0;9.0" (A100, H100)
  MAX_JOBS              parallel compile jobs (ninja)
Install with `pip install -e . --no-build-isolation` so the build sees the installed torch.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extensions():
    if flag("MEDLVR_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    with_cuda = flag("MEDLVR_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    if flag("MEDLVR_SKIP_CUDA"):
        with_cuda = False
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++20 from torch 2.10).
    # -fopenmp-simd: honour `#pragma omp simd` reductions without an OpenMP runtime;
    # -fno-trapping-math: lets GCC if-convert the float selects in the hot loops (with
    # trapping math on it keeps them as branches and vectorises nothing). medlvr never
    # reads floating-point exception flags.
    cxx = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
    if not with_cuda:
        print("medlvr: building the C++ CPU kernels only", flush=True)
        ext = CppExtension("medlvr._C", cpp, extra_compile_args={"cxx": cxx})
        return [ext], {"build_ext": BuildExtension}
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"medlvr: building C++ and CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}", flush=True)
    # The arch list travels as one preprocessor token ("8.0;9.0" -> sm80_90): quotes and
    # semicolons do not survive the shell that ninja runs the compilers in.
    token = "sm" + "_".join("".join(ch for ch in a if ch.isalnum()) for a in archs.replace(";", " ").split())
    macros = ["-DMEDLVR_WITH_CUDA", f"-DMEDLVR_CUDA_ARCHS={token}"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", *macros]
    ext = CUDAExtension("medlvr._C", cpp + cu, extra_compile_args={"cxx": cxx + macros, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["medlvr", "medlvr.*"]) + ["medlvr.kernels"],
    package_dir={"medlvr.kernels": "kernels"},
    package_data={"medlvr.models": ["assets/*", "assets/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
