// Branch-free float math that GCC auto-vectorises (no libm calls inside hot loops).
#pragma once
#include <cstdint>
#include <cstring>

namespace medlvr {

// exp(x) for x <= 0 (every call site subtracts a running max first), |rel err| < 2e-7.
// Range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial for e^r
// (truncation error r^8/8! < 2e-9 there) scaled by 2^n built in the exponent bits.
// Below -87.3 the result would be subnormal: return 0, which is also exp(-inf).
static inline __attribute__((always_inline)) float exp_nonpos(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693145751953125f;     // ln2 split so n*ln2_hi is exact
  const float ln2_lo = 1.42860682030941723e-6f;
  const float round_magic = 12582912.0f;       // 1.5 * 2^23: adding it rounds to an integer
  float xc = x < -87.3f ? -87.3f : x;          // also maps -inf and keeps the int cast in range
  float t = xc * log2e + round_magic;
  float n = t - round_magic;
  float r = xc - n * ln2_hi;
  r = r - n * ln2_lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float e = p * scale;
  return x < -87.3f ? 0.0f : e;
}

}  // namespace medlvr
