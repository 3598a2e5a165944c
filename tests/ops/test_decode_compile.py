"""The decode kernels compile for an H100 (sm_90) without spilling registers.

The interpreter tests prove the math; they cannot see what the GPU compiler does with
the kernels (a branch that only fails to lower on NVIDIA, libdevice calls, tensor-core
dot shapes, register pressure). triton.compile targets sm_90 without a GPU and its
bundled ptxas reports registers and spills, so CI checks that too. Configurations are
the launchers' real ones at Qwen2.5-VL-7B shapes.

The compilation runs in a subprocess: conftest sets TRITON_INTERPRET=1 for this process,
and triton's own @jit helpers (tl.sum, tl.max, ...) are then interpreter objects that
cannot be compiled. Run this file directly to see the numbers:
    python tests/ops/test_decode_compile.py
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "..", "kernels")


def _ptxas():
    spec = importlib.util.find_spec("triton")
    return os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")


# ------------------------------------------------------------------ subprocess side
def _load(name):
    spec = importlib.util.spec_from_file_location(f"_sm90_{name}", os.path.join(KERNELS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile_sm90(fn, pointer_types, constexprs, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Mirror what a real launch specialises on: every innermost stride (named *_d) is
    # 1, pointers and the other strides are multiples of 16 bytes / elements. Without
    # this the loads are not vectorised and the numbers describe a different kernel.
    constexprs = dict(constexprs)
    for name in fn.arg_names:
        if name.startswith("s") and name.endswith("_d"):
            constexprs[name] = 1
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = pointer_types.get(name, "i64")  # strides are int64 (a big KV cache overflows int32)
        if sig[name].startswith("*") or (sig[name] == "i64" and name.startswith("s")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return {"regs": int(re.search(r"Used (\d+) registers", res.stderr).group(1)),
            "spill_bytes": sum(int(x) for x in re.findall(r"(\d+) bytes spill", res.stderr)),
            "approx_trig": "sin.approx" in ptx or "cos.approx" in ptx,
            "mma": "mma" in ptx,
            "cp_async": "cp.async" in ptx}


def _compile_all():
    import triton.language as tl

    out = {}
    rot = _load("rotary_append")
    ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "kc_ptr", "vc_ptr")}
    ptrs.update(pos_ptr="*i64", inv_freq_ptr="*fp32", slots_ptr="*i32", seq_cap="i32")
    for mrope in (True, False):
        out[f"rotary mrope={mrope}"] = _compile_sm90(
            rot._rotary_append_kernel, ptrs,
            dict(HQ=28, HALF=64, ROT_DIM=128 if mrope else 112, HEAD_DIM=128, SEC0=16, SEC01=40, MROPE=mrope,
                 BLOCK_HALF=64, BLOCK_PASS=0 if mrope else 16, PRECISE_TRIG=True, EMU=False), num_warps=1)
    att = _load("decode_attention")
    for dtype in ("bf16", "fp16"):
        ptrs = {"q_ptr": f"*{dtype}", "kc_ptr": f"*{dtype}", "vc_ptr": f"*{dtype}", "len_ptr": "*i32",
                "o_ptr": f"*{dtype}", "lse_ptr": "*fp32", "part_ptr": "*fp32", "map_ptr": "*i64",
                "lo_ptr": "*fp32", "qk_scale": "fp32", "split_len": "i32", "seq_cap": "i32", "row_cap": "i32"}
        for single in ((False, True) if dtype == "bf16" else (False,)):
            # cascade=True: the prefix call of grouped rollouts (row map + lse output)
            for cascade in ((False, True) if dtype == "bf16" else (False,)):
                out[f"attention stage1 {dtype} single={single} cascade={cascade}"] = _compile_sm90(
                    att._decode_attn_stage1, ptrs,
                    dict(GROUP=7, HEAD_DIM=128, BLOCK_G=16, BLOCK_D=128, BLOCK_N=att.BLOCK_N, SINGLE=single,
                         DOT_PREC="tf32", UPCAST_DOT=False, EMU=False, HAS_MAP=cascade, WRITE_LSE=cascade),
                    num_warps=4, num_stages=2)
        if dtype != "bf16":
            continue
        for lse in (False, True):
            out[f"attention stage2 {dtype} lse={lse}"] = _compile_sm90(
                att._decode_attn_stage2,
                {"o_ptr": f"*{dtype}", "lse_ptr": "*fp32", "part_ptr": "*fp32", "lo_ptr": "*fp32"},
                dict(SPLITS=64, HEAD_DIM=128, BLOCK_S=64, BLOCK_D=128, EMU=False, WRITE_LSE=lse), num_warps=4)
    rms = _load("rmsnorm_feedback")
    out["rmsnorm bf16"] = _compile_sm90(
        rms._rmsnorm_feedback_kernel,
        {"h_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "active_ptr": "*i1", "eps": "fp32"},
        dict(D=3584, BLOCK_D=4096, HAS_ACTIVE=True, RES=tl.bfloat16, EMU=False), num_warps=8)
    # the layers' residual add + norm: bf16 throughout, and bf16 x onto an fp32 residual (autocast)
    for r_dtype, tl_sum in (("bf16", tl.bfloat16), ("fp32", tl.float32)):
        out[f"add_rmsnorm x bf16 residual {r_dtype}"] = _compile_sm90(
            rms._add_rmsnorm_kernel,
            {"x_ptr": "*bf16", "r_ptr": f"*{r_dtype}", "w_ptr": "*bf16", "out_ptr": f"*{r_dtype}",
             "res_out_ptr": f"*{r_dtype}", "eps": "fp32"},
            dict(D=3584, BLOCK_D=4096, SUM=tl_sum, RES=tl_sum, EMU=False), num_warps=8)
    return out


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def compiled():
    if not os.path.exists(_ptxas()):
        pytest.skip("triton's bundled ptxas is absent")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_no_register_spills(compiled):
    spilled = {k: v for k, v in compiled.items() if v["spill_bytes"]}
    assert not spilled, spilled


def test_add_rmsnorm_compiles(compiled):
    assert {"add_rmsnorm x bf16 residual bf16", "add_rmsnorm x bf16 residual fp32"} <= set(compiled)


def test_rotary_uses_precise_trig(compiled):
    # Positions reach 10^4 rad: the approximate PTX sin/cos lose all accuracy there.
    assert not any(v["approx_trig"] for k, v in compiled.items() if k.startswith("rotary"))


def test_attention_dots_on_tensor_cores_and_loads_pipelined(compiled):
    stage1 = {k: v for k, v in compiled.items() if k.startswith("attention stage1")}
    assert all(v["mma"] for v in stage1.values())
    # K/V tiles stream through shared memory asynchronously (software pipelining).
    assert all(v["cp_async"] for v in stage1.values())


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
