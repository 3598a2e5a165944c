"""Triton helpers shared by the kernels of medlvr.kernels."""
import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """x.to(dtype), rounding to nearest even. On GPUs that is what .to() does; triton
    3.8's CPU interpreter truncates fp32 -> bf16 instead, so there the rounding is
    done on the bits first (the value then converts exactly)."""
    if EMULATE_RTNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def lanes(start, BLOCK: tl.constexpr, n):
    """The BLOCK indices start, start + 1, ... of a tile and which of them are below n (the
    tile's in-bounds mask: lanes past the end load ``other`` and store nothing)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < n
