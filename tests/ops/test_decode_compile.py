"""Every Triton launch the package makes compiles for an H100 (sm_90) and an A100 (sm_80)
within the hardware's limits and without spilling registers.

The interpreter tests prove the math; they cannot see what the GPU compiler does with the
kernels (a branch that only fails to lower on NVIDIA, libdevice calls, tensor-core dot
shapes, register pressure). No GPU is needed to see it: the package's own ops are called
on fake CUDA tensors at the shapes of the models it supports (tests/ops/_compile_workloads.py),
every launch is captured and bound by Triton's own binder for each target, so the compiled
kernel is specialised as the real call's would be (tests/ops/_launch_capture.py), and
ptxas' report gives registers, stack and spills.

Limits: 255 registers a thread and 64 K a block, 227 KB (sm_90) / 163 KB (sm_80) shared
memory a block, CUDA's grid limits, and SPILL_BUDGET = 16 bytes of spill stores or of
spill loads a thread. A spill in a decode kernel's K/V loop is local-memory traffic on
every tile, thousands of times per generated token: the fp32 attention tiles are sized so
that none spills (medlvr/kernels/decode_attention.py). The budget admits what ptxas does to
the ROI-loss kernels (4-16 B, both targets) and on sm_80 to fp32 one-split decode
attention (4 B): in their SASS one to four registers are stored to local memory once
before the loop nest and loaded once after it, a few bytes per program next to the tens
of KB each program reads.
A spill in a K/V loop moves kilobytes and fails.

Two sizes: the CI run compiles one binary per kernel variant (constexprs, pointer dtypes,
launch options) that a sample of the workloads reaches (~65 a target, ~1 minute on the
shared 2-core development machine); MEDLVR_COMPILE_ALL=1 (marked slow) compiles every distinct
specialisation of the whole grid of shapes. Both write their table (one row per compiled
binary: registers, spills, shared memory) to $MEDLVR_COMPILE_TABLE, or to pytest's tmp dir.

The compilation runs in a subprocess: conftest sets TRITON_INTERPRET=1 for this process,
and triton's own @jit helpers (tl.sum, tl.max, ...) are then interpreter objects that
cannot be compiled. Run the file directly to see the numbers:
    python tests/ops/test_decode_compile.py [--all] [--table DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPILL_BUDGET = 16  # bytes of spill stores or of spill loads a thread (see the module docstring)
ARCHS = (90, 80)
COLUMNS = ["arch", "kernel", "variant", "launches", "example", "regs", "stack", "spill_stores", "spill_loads",
           "shared", "num_warps", "num_stages", "grid", "problems"]


# ------------------------------------------------------------------ subprocess side
def _variant(src) -> str:
    """The constexprs and pointer dtypes of a binary, in short."""
    names = src.fn.arg_names
    const = [f"{names[k[0]]}={v}" for k, v in sorted(src.constants.items()) if names[k[0]][0].isupper()]
    ptrs = sorted({t for t in src.signature.values() if t.startswith("*")})
    return " ".join(const + ptrs)


def _collect(full: bool):
    """[(arch, [launch, ...]) per binary]: every launch of the workloads, grouped by the
    binary it compiles to (CI: one per variant, ignoring integer specialisations)."""
    import _compile_workloads as cw
    import _launch_capture as lc

    out = []
    for arch in ARCHS:
        with lc.capture(sms=lc.TARGETS[arch]["sms"]) as rec:
            for label, call in cw.workloads(full):
                rec.workload = label
                call()
        groups: dict[str, list] = {}
        for launch in rec.launches:
            if full:
                key = lc.key_of(launch, arch)
            else:
                _, src, opts = lc.bind(launch, arch)
                key = repr((launch.name, _variant(src), sorted(opts.__dict__.items(), key=str)))
            groups.setdefault(key, []).append(launch)
        out += [(arch, ls) for ls in groups.values()]
    return out


def _compile_all(full: bool) -> list[dict]:
    import _launch_capture as lc

    rows = []
    for arch, launches in _collect(full):
        first = launches[0]
        _, src, _ = lc.bind(first, arch)
        row = dict(arch=f"sm_{arch}", kernel=first.name, variant=_variant(src), launches=len(launches),
                   example=first.workload, grid="x".join(map(str, first.grid)), signature=dict(src.signature))
        try:
            res = lc.compile_launch(first, arch)
            problems = [p for launch in launches for p in lc.check(res, launch, arch, SPILL_BUDGET)]
        except Exception as e:  # a compile error is a finding, reported with the others
            res, problems = {}, [f"compile error: {type(e).__name__}: {str(e)[:500]}"]
        row.update(res)
        row["problems"] = "; ".join(dict.fromkeys(problems))
        rows.append(row)
    return rows


def _write_table(rows: list[dict], folder: str, stem: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{stem}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Triton launches compiled for sm_90a and sm_80 ({stem})", "",
             f"Spill budget {SPILL_BUDGET} B a thread. Written by tests/ops/test_decode_compile.py (ptxas 12.9 "
             f"bundled with triton 3.8, no GPU); {stem}.csv has one row per compiled binary.", ""]
    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch and "regs" in r]
        worst_spill = max(mine, key=lambda r: r["spill_stores"] + r["spill_loads"])
        worst_smem = max(mine, key=lambda r: r["shared"])
        worst_regs = max(mine, key=lambda r: r["regs"])
        lines += [f"- {arch}: {len(mine)} binaries from {sum(r['launches'] for r in mine)} launches; worst spill "
                  f"{worst_spill['spill_stores']} B stores / {worst_spill['spill_loads']} B loads "
                  f"({worst_spill['kernel']}, {worst_spill['example']}); most shared memory "
                  f"{worst_smem['shared']} B ({worst_smem['kernel']}, {worst_smem['example']}); most registers "
                  f"{worst_regs['regs']} ({worst_regs['kernel']}, {worst_regs['example']})"]
    # per kernel and float dtypes: the range over its binaries (every row is in the CSV)
    groups: dict[tuple, list] = {}
    for r in rows:
        floats = " ".join(t for t in r["variant"].split() if t.startswith("*") and not t.startswith("*i"))
        groups.setdefault((r["arch"], r["kernel"], floats), []).append(r)
    head = ["arch", "kernel", "pointer dtypes", "binaries", "launches", "registers", "max stack B",
            "max spill st/ld B", "max shared B", "warps", "problems"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arch, kernel, floats), rs in groups.items():
        ok = [r for r in rs if "regs" in r]  # compiled (not a compile error)

        def most(k, ok=ok):
            return max((r[k] for r in ok), default="")

        regs = sorted(r["regs"] for r in ok)
        cells = [arch, kernel, floats, len(rs), sum(r["launches"] for r in rs),
                 f"{regs[0]}-{regs[-1]}" if regs else "", most("stack"),
                 f"{most('spill_stores')}/{most('spill_loads')}", most("shared"),
                 ",".join(sorted({str(r["num_warps"]) for r in ok})), sum(bool(r["problems"]) for r in rs)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    with open(os.path.join(folder, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--all", action="store_true", help="every distinct specialisation of the whole grid")
    p.add_argument("--table", help="folder to write compile_launches[-all].{csv,md} into")
    a = p.parse_args(argv)
    sys.path.insert(0, HERE)
    rows = _compile_all(a.all)
    if a.table:
        _write_table(rows, a.table, "compile_launches-all" if a.all else "compile_launches")
    print(json.dumps(rows))


# ------------------------------------------------------------------ tests
def _ptxas():
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")


def _run(tmp_path_factory, full: bool) -> list[dict]:
    if not os.path.exists(_ptxas()):
        pytest.skip("triton's bundled ptxas is absent")
    table = os.environ.get("MEDLVR_COMPILE_TABLE") or str(tmp_path_factory.mktemp("compile"))
    # Native triton (no interpreter); the ops pick Triton on the fake CUDA tensors.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MEDLVR_BACKEND="triton", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--table", table] + (["--all"] if full else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600 if full else 900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _run(tmp_path_factory, full=False)


def _failures(rows):
    return {f"{r['arch']} {r['kernel']} [{r['variant']}] ({r['example']})": r["problems"]
            for r in rows if r["problems"]}


def test_every_launch_compiles_within_limits(compiled):
    assert {r["arch"] for r in compiled} == {"sm_90", "sm_80"}
    assert not _failures(compiled)


def test_every_kernel_and_path_is_reached(compiled):
    # the sample must keep reaching every kernel and both prefix paths of grouped rollouts
    kernels = {r["kernel"] for r in compiled}
    assert kernels >= {"_rotary_append_kernel", "_decode_attn_stage1", "_decode_attn_stage2", "_add_rmsnorm_kernel",
                       "_rmsnorm_feedback_kernel", "_roi_loss_fwd_kernel", "_roi_loss_bwd_latent_kernel",
                       "_roi_loss_bwd_vision_kernel"}
    stage1 = [r["variant"] for r in compiled if r["kernel"] == "_decode_attn_stage1"]
    assert any("HAS_MAP=True" in v for v in stage1) and any("BLOCK_G=64" in v for v in stage1)
    assert any("SINGLE=True" in v for v in stage1) and any("SINGLE=False" in v for v in stage1)


def test_specialised_as_the_engine_calls(compiled):
    # The engine's lengths are int64 tensors and its strides Python ints below 2^31: Triton
    # binds them as *i64 and i32, a unit innermost stride as the constant 1.
    for r in compiled:
        if r["kernel"] == "_decode_attn_stage1":
            sig = r["signature"]
            assert (sig["len_ptr"], sig["sk_l"], sig["sk_d"]) == ("*i64", "i32", "constexpr"), r["example"]


def test_rotary_uses_precise_trig(compiled):
    # Positions reach 10^4 rad: the approximate PTX sin/cos lose all accuracy there.
    assert not any(r["approx_trig"] for r in compiled if r["kernel"] == "_rotary_append_kernel")


def test_attention_dots_on_tensor_cores_and_loads_pipelined(compiled):
    stage1 = [r for r in compiled if r["kernel"] == "_decode_attn_stage1"]
    # bf16/fp16 dots on tensor cores (fp32 caches use exact IEEE dots: FMA, by design)
    assert all(r["mma"] for r in stage1 if "*bf16" in r["variant"] or "*fp16" in r["variant"])
    # K/V tiles stream through shared memory asynchronously (software pipelining).
    assert all(r["cp_async"] for r in stage1)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEDLVR_COMPILE_ALL"),
                    reason="the whole grid (709 binaries, ~10 min on 2 cores): set MEDLVR_COMPILE_ALL=1")
def test_whole_grid_compiles_within_limits(tmp_path_factory):
    rows = _run(tmp_path_factory, full=True)
    assert not _failures(rows)


if __name__ == "__main__":
    main()
