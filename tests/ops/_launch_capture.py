"""Capture the Triton launches the package's own launchers make, and compile each one for
a given NVIDIA target exactly as a real call would, without a GPU.

Capture: the launchers are called on fake CUDA tensors (torch's FakeTensorMode: shapes,
strides, dtypes and devices, no storage), and ``JITFunction.run`` (triton 3.8,
triton/runtime/jit.py, the method ``kernel[grid](...)`` calls) is replaced by a recorder.
Tensors are recorded as stand-ins that keep what Triton specialises a pointer on (its
dtype and the 16-byte alignment of its address: a view at storage offset o starts o *
itemsize bytes past an allocation, and CUDA allocations are 256-byte aligned); every other
argument is recorded as passed (Python ints, floats, constexprs, launch options).

Compile: the recorded arguments go through Triton's own binder for the target
(``create_function_from_signature`` + ``JITFunction._pack_args``, the two steps
``JITFunction.run`` takes before ``triton.compile``): an int is i32 or i64 by its value,
1 becomes a constant, a multiple of 16 gets the divisibility attribute, a pointer's
alignment likewise, so the compiled kernel is the one the real call would get. ptxas'
own report (``-v``, which triton runs anyway) gives registers, stack frame and spills;
triton's metadata gives the shared memory.

Needs a process in which triton was imported without TRITON_INTERPRET (the tests run
this in a subprocess: tests/ops/test_decode_compile.py).
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

import torch

# per-block limits (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"): 255 registers a thread, 64 K registers a block, opt-in shared memory
# per block 227 KB on sm_90 and 163 KB on sm_80; SMs of an H100 SXM and an A100.
TARGETS = {
    90: dict(gpu="H100", sms=132, max_shared=227 * 1024, max_regs=255, regs_per_block=65536),
    80: dict(gpu="A100", sms=108, max_shared=163 * 1024, max_regs=255, regs_per_block=65536),
}
MAX_GRID_YZ = 65535
MAX_GRID_X = 2 ** 31 - 1


class Pointer:
    """What Triton's binder reads of a tensor argument: dtype and data_ptr()."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 256 * 1024 + t.storage_offset() * t.element_size()
        self.desc = f"{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}"

    def data_ptr(self) -> int:
        return self._ptr

    @staticmethod
    def ptr_range() -> int:
        return 0


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    workload: str = ""
    device: object = None  # the device current (torch.cuda.device) at launch time

    @property
    def name(self) -> str:
        return self.fn.__name__


@dataclass
class Recorder:
    launches: list = field(default_factory=list)
    workload: str = ""
    current: list = field(default_factory=lambda: [None])


class _DeviceGuard:
    """Stands in for torch.cuda.device (no driver here): records the index it sets."""

    def __init__(self, rec: Recorder, device):
        self.rec = rec
        self.index = device.index if isinstance(device, torch.device) else device

    def __enter__(self):
        self.prev = self.rec.current[0]
        self.rec.current[0] = self.index
        return self

    def __exit__(self, *exc):
        self.rec.current[0] = self.prev
        return False


def _wrap(x):
    return Pointer(x) if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def capture(sms: int = 132):
    """Within: fake CUDA tensors can be made (FakeTensorMode), every Triton launch is
    recorded instead of run, ``torch.cuda.device`` records the index it would set, and the
    decode launcher sees ``sms`` streaming multiprocessors. Yields the Recorder."""
    import triton.runtime.jit as jit
    from torch._subclasses.fake_tensor import FakeTensorMode

    from medlvr.kernels import decode_attention as att

    rec = Recorder()

    def run(self, *args, grid, warmup, **kwargs):
        rec.launches.append(Launch(self, tuple(_wrap(a) for a in args), {k: _wrap(v) for k, v in kwargs.items()},
                                   tuple(grid), rec.workload, rec.current[0]))

    from triton.runtime.interpreter import InterpretedFunction

    # both kinds of kernel object: @triton.jit makes InterpretedFunctions under TRITON_INTERPRET=1
    patches = [(jit.JITFunction, "run", run), (InterpretedFunction, "run", run),
               (torch.cuda, "device", lambda d: _DeviceGuard(rec, d)), (att, "sm_count", lambda index: sms)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield rec
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


# ------------------------------------------------------------------------ compile
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def bind(launch: Launch, arch: int):
    """Triton's own specialisation of this launch for sm_<arch>: (ASTSource, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(fn, signature, constexprs, attrs), options


def key_of(launch: Launch, arch: int) -> str:
    """Two launches with one key compile to the same binary."""
    _, src, options = bind(launch, arch)
    return repr((launch.name, arch, sorted(src.signature.items()), sorted(src.constants.items(), key=str),
                 sorted(src.attrs.items(), key=str), sorted(options.__dict__.items(), key=str)))


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile for sm_<arch> (sm_90a for 90, as triton does) and report ptxas' figures."""
    import triton
    from triton import knobs

    target, src, options = bind(launch, arch)
    out = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True  # triton runs ptxas -v; this prints its report
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        with contextlib.redirect_stdout(out):
            kernel = triton.compile(src, target=target, options=options.__dict__)
    log = out.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    m = _PTXAS.search(log)
    if regs is None or m is None:
        raise RuntimeError(f"no ptxas report for {launch.name}: {log[-2000:]}")
    ptx = kernel.asm["ptx"]
    return dict(regs=int(regs.group(1)), stack=int(m.group(1)), spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)), shared=int(kernel.metadata.shared), num_warps=options.num_warps,
                num_stages=options.num_stages, mma="mma" in ptx, cp_async="cp.async" in ptx,
                approx_trig="sin.approx" in ptx or "cos.approx" in ptx)


def check(result: dict, launch: Launch, arch: int, spill_budget: int) -> list[str]:
    """What is over a limit, in words (empty: fine)."""
    lim = TARGETS[arch]
    bad = []
    if result["regs"] > lim["max_regs"]:
        bad.append(f"{result['regs']} registers > {lim['max_regs']}")
    if result["regs"] * 32 * result["num_warps"] > lim["regs_per_block"]:
        bad.append(f"{result['regs']} registers x {32 * result['num_warps']} threads > {lim['regs_per_block']}")
    if result["shared"] > lim["max_shared"]:
        bad.append(f"{result['shared']} B shared memory > {lim['max_shared']}")
    if max(result["spill_stores"], result["spill_loads"]) > spill_budget:
        bad.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads > "
                   f"budget {spill_budget} B")
    g = launch.grid + (1,) * (3 - len(launch.grid))
    if not (1 <= g[0] <= MAX_GRID_X and 1 <= g[1] <= MAX_GRID_YZ and 1 <= g[2] <= MAX_GRID_YZ):
        bad.append(f"grid {launch.grid} outside CUDA's limits")
    return bad
