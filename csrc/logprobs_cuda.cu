// CUDA kernels of gather_logprobs and latent_gaussian_logprob.
//
// Forward: one thread block per row. Each thread streams 16-byte vectors of its row
// (8 bf16/fp16 or 4 fp32), keeps an online (max, sum-exp[, sum-exp*y]) triple in fp32, and
// the block merges the triples with warp shuffles and one shared-memory round. The row is
// read from HBM exactly once, and the only outputs are three fp32 numbers per row.
// Every arithmetic type is acc_t = at::opmath_type<scalar_t>: fp32 for fp16/bf16/fp32
// and double for double, the scalars 1/T and 1/(2 sigma^2) included, so fp64 inputs are
// computed in fp64 end to end (medlvr's fp64 rule, medlvr/ops/_checks.py). --use_fast_math
// touches single-precision math only.
// Backward: a 2-D grid (row, column tile) recomputes p = exp(y - lse) from the logits and
// writes d logits once, optionally over the logits buffer itself. Together: read logits
// twice and write the gradient once, which is the memory floor of this op.
// Nothing uses atomics, so results are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10's stream/guard headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS,
// cuSPARSE and cuSOLVER headers, which a toolkit without those libraries lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits>

namespace medlvr {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Online logsumexp state: sum = sum_j exp(y_j - m), tsum = sum_j exp(y_j - m) (y_j - m).
// tsum is relative to the running max so that H = log(sum) - tsum / sum does not cancel
// two numbers of the size of the logits; re-basing on a new max M multiplies both by
// f = exp(m - M) and shifts tsum by (m - M) sum.
template <typename acc_t>
struct LseState {
  acc_t m, sum, tsum;
};

template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> merge(LseState<acc_t> a, LseState<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == -std::numeric_limits<acc_t>::infinity()) return a;  // both empty
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  // An empty side (m = -inf) contributes nothing; never form -inf * 0.
  const acc_t sa = a.m == -kInf ? acc_t(0) : exp(a.m - m), sb = b.m == -kInf ? acc_t(0) : exp(b.m - m);
  const acc_t ta = a.m == -kInf ? acc_t(0) : sa * (a.tsum + (a.m - m) * a.sum);
  const acc_t tb = b.m == -kInf ? acc_t(0) : sb * (b.tsum + (b.m - m) * b.sum);
  return {m, a.sum * sa + b.sum * sb, ta + tb};
}

template <typename acc_t, int BLOCK>
__device__ LseState<acc_t> block_merge(LseState<acc_t> st) {
  constexpr int kWarps = BLOCK / 32;
  __shared__ acc_t sm[kWarps], ss[kWarps], st_[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState<acc_t> o{__shfl_xor_sync(0xffffffff, st.m, off), __shfl_xor_sync(0xffffffff, st.sum, off),
                      __shfl_xor_sync(0xffffffff, st.tsum, off)};
    st = merge(st, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.sum;
    st_[warp] = st.tsum;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? LseState<acc_t>{sm[lane], ss[lane], st_[lane]}
                       : LseState<acc_t>{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      LseState<acc_t> o{__shfl_xor_sync(0xffffffff, st.m, off), __shfl_xor_sync(0xffffffff, st.sum, off),
                        __shfl_xor_sync(0xffffffff, st.tsum, off)};
      st = merge(st, o);
    }
  }
  return st;  // valid in thread 0
}

// Fold VEC values into the thread's state: one max over the vector, one rescale at most,
// then VEC exps — instead of a rescale per element.
template <typename acc_t, int VEC, bool ENTROPY>
__device__ __forceinline__ void fold(LseState<acc_t>& st, const acc_t (&y)[VEC]) {
  acc_t vm = y[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) vm = y[k] > vm ? y[k] : vm;
  if (vm > st.m) {
    if (st.m != -std::numeric_limits<acc_t>::infinity()) {
      const acc_t f = exp(st.m - vm);
      if (ENTROPY) st.tsum = f * (st.tsum + (st.m - vm) * st.sum);
      st.sum *= f;
    }
    st.m = vm;
  }
  if (st.m == -std::numeric_limits<acc_t>::infinity()) return;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const acc_t d = y[k] - st.m;
    const acc_t e = exp(d);
    st.sum += e;
    if (ENTROPY) st.tsum += e > acc_t(0) ? e * d : acc_t(0);  // 0 * -inf would be NaN
  }
}

template <typename scalar_t, int BLOCK, int VEC, bool ENTROPY>
__global__ void __launch_bounds__(BLOCK) logprobs_fwd_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets, int64_t V, int64_t ld,
    at::opmath_type<scalar_t> inv_t, int64_t ignore_index, at::opmath_type<scalar_t>* __restrict__ logp,
    at::opmath_type<scalar_t>* __restrict__ lse, at::opmath_type<scalar_t>* __restrict__ entropy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;  // int64 before any pointer arithmetic: N * ld overflows int32
  const int64_t tgt = targets[row];
  if (tgt == ignore_index) {
    if (threadIdx.x == 0) {
      logp[row] = acc_t(0);
      lse[row] = acc_t(0);
      if (ENTROPY) entropy[row] = acc_t(0);
    }
    return;
  }
  const scalar_t* x = logits + row * ld;
  const acc_t it = inv_t;
  LseState<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
  const int64_t nvec = V / VEC;
  const auto* xv = reinterpret_cast<const Pack<scalar_t, VEC>*>(x);
  for (int64_t i = threadIdx.x; i < nvec; i += BLOCK) {
    const Pack<scalar_t, VEC> p = xv[i];
    acc_t y[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) y[k] = static_cast<acc_t>(p.v[k]) * it;
    fold<acc_t, VEC, ENTROPY>(st, y);
  }
  for (int64_t j = nvec * VEC + threadIdx.x; j < V; j += BLOCK) {
    const acc_t y[1] = {static_cast<acc_t>(x[j]) * it};
    fold<acc_t, 1, ENTROPY>(st, y);
  }
  st = block_merge<acc_t, BLOCK>(st);
  if (threadIdx.x == 0) {
    const acc_t log_s = log(st.sum);
    const acc_t l = st.m + log_s;
    lse[row] = l;
    logp[row] = static_cast<acc_t>(x[tgt]) * it - l;
    // H = -sum p log p = -sum p (y - m - log s) = log s - tsum / sum
    if (ENTROPY) entropy[row] = log_s - st.tsum / st.sum;
  }
}

template <typename scalar_t, int VEC, bool ENTROPY>
__global__ void logprobs_bwd_kernel(const scalar_t* logits, scalar_t* out, const int64_t* targets,
                                    const at::opmath_type<scalar_t>* __restrict__ grad_logp,
                                    const at::opmath_type<scalar_t>* __restrict__ grad_ent,
                                    const at::opmath_type<scalar_t>* __restrict__ lse,
                                    const at::opmath_type<scalar_t>* __restrict__ entropy, int64_t V, int64_t ld_in, int64_t ld_out,
                                    at::opmath_type<scalar_t> inv_t, int64_t ignore_index) {
  // `out` may alias `logits` (in-place backward), hence no __restrict__ on either: each
  // thread reads its vector, then writes the same addresses.
  using acc_t = at::opmath_type<scalar_t>;
  // Rows on grid.x (up to 2^31 packed tokens), column tiles on grid.y (V / 2048 of them).
  const int64_t row = blockIdx.x;
  const int64_t tgt = targets[row];
  const int64_t v0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (v0 >= V) return;
  scalar_t* o = out + row * ld_out + v0;
  const int64_t n = V - v0 < VEC ? V - v0 : VEC;
  if (tgt == ignore_index) {
    for (int k = 0; k < n; ++k) o[k] = scalar_t(0);
    return;
  }
  const scalar_t* x = logits + row * ld_in + v0;
  const acc_t it = inv_t, l = lse[row], g = grad_logp[row];
  const acc_t ge = ENTROPY ? grad_ent[row] : acc_t(0), h = ENTROPY ? entropy[row] : acc_t(0);
  Pack<scalar_t, VEC> p;
  if (n == VEC) {
    p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x);
  } else {
    for (int k = 0; k < n; ++k) p.v[k] = x[k];
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const acc_t lp = static_cast<acc_t>(p.v[k]) * it - l;
    const acc_t pr = exp(lp);
    // d y_j = g (1[j = t] - p_j) - g_H p_j (log p_j + H); d x = d y / T
    acc_t d = (v0 + k == tgt ? g : acc_t(0)) - g * pr;
    if (ENTROPY) d -= pr > acc_t(0) ? ge * pr * (lp + h) : acc_t(0);
    p.v[k] = static_cast<scalar_t>(d * it);
  }
  if (n == VEC) {
    *reinterpret_cast<Pack<scalar_t, VEC>*>(o) = p;
  } else {
    for (int k = 0; k < n; ++k) o[k] = p.v[k];
  }
}

template <typename T>
bool aligned16(const T* ptr, int64_t ld) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

template <typename scalar_t, int BLOCK, int VEC>
void launch_fwd(const at::Tensor& logits, const int64_t* tg, int64_t V, double inv_t, int64_t ignore_index,
                bool with_entropy, at::Tensor& logp, at::Tensor& lse, at::Tensor& entropy, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0);
  auto args = std::make_tuple(logits.data_ptr<scalar_t>(), tg, V, logits.stride(0), static_cast<acc_t>(inv_t),
                              ignore_index,
                              logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
                              with_entropy ? entropy.data_ptr<acc_t>() : nullptr);
  if (with_entropy) {
    std::apply([&](auto... a) { logprobs_fwd_kernel<scalar_t, BLOCK, VEC, true><<<N, BLOCK, 0, stream>>>(a...); }, args);
  } else {
    std::apply([&](auto... a) { logprobs_fwd_kernel<scalar_t, BLOCK, VEC, false><<<N, BLOCK, 0, stream>>>(a...); }, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block size by V: enough threads to keep 16-byte loads in flight on a 152k-wide row,
// few enough that a narrow row does not leave most of the block idle.
template <typename scalar_t, int VEC>
void dispatch_fwd(const at::Tensor& logits, const int64_t* tg, int64_t V, double inv_t, int64_t ignore_index,
                  bool with_entropy, at::Tensor& logp, at::Tensor& lse, at::Tensor& entropy, cudaStream_t s) {
  const int64_t vecs = V / VEC;
  if (vecs >= 8 * 1024) {
    launch_fwd<scalar_t, 1024, VEC>(logits, tg, V, inv_t, ignore_index, with_entropy, logp, lse, entropy, s);
  } else if (vecs >= 8 * 256) {
    launch_fwd<scalar_t, 256, VEC>(logits, tg, V, inv_t, ignore_index, with_entropy, logp, lse, entropy, s);
  } else {
    launch_fwd<scalar_t, 64, VEC>(logits, tg, V, inv_t, ignore_index, with_entropy, logp, lse, entropy, s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits_in,
                                                                  const at::Tensor& targets_in,
                                                                  double inv_temperature, int64_t ignore_index,
                                                                  bool with_entropy) {
  TORCH_CHECK(logits_in.dim() == 2, "logits must be 2-D");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  const auto targets = targets_in.to(at::kLong).contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto stat = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // fp64 logits (gradcheck) keep fp64 statistics; every other dtype gets fp32.
  auto logp = at::empty({N}, logits.options().dtype(stat));
  auto lse = at::empty({N}, logits.options().dtype(stat));
  auto entropy = at::empty({with_entropy ? N : 0}, logits.options().dtype(stat));
  if (N == 0) return {logp, lse, entropy};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const double it = inv_temperature;  // rounded to acc_t at the launch: fp32, or double for fp64
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (aligned16(logits.data_ptr<scalar_t>(), logits.stride(0))) {
      dispatch_fwd<scalar_t, kVec>(logits, targets.data_ptr<int64_t>(), V, it, ignore_index, with_entropy, logp,
                                   lse, entropy, stream);
    } else {
      dispatch_fwd<scalar_t, 1>(logits, targets.data_ptr<int64_t>(), V, it, ignore_index, with_entropy, logp, lse,
                                entropy, stream);
    }
  });
  return {logp, lse, entropy};
}

void logprobs_bwd_into_cuda(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& lse,
                            const c10::optional<at::Tensor>& entropy, double inv_temperature, int64_t ignore_index,
                            at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(logits.stride(1) == 1 && out.stride(1) == 1, "logits rows must be contiguous");
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0 || V == 0) return;
  const bool has_ge = grad_entropy.has_value() && grad_entropy->defined() && grad_entropy->numel() > 0;
  TORCH_CHECK(!has_ge || (entropy.has_value() && entropy->numel() == N),
              "an entropy gradient needs the forward's entropy");
  const auto targets = targets_in.to(at::kLong).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t it = static_cast<acc_t>(inv_temperature);  // fp64 inputs keep 1/T in double
    constexpr int kThreads = 256;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const auto ls = lse.to(acc).contiguous();
    const auto g = grad_logp.to(acc).contiguous();
    const auto ge = has_ge ? grad_entropy->to(acc).contiguous() : at::Tensor();
    const auto h = has_ge ? entropy->to(acc).contiguous() : at::Tensor();
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t tiles = (V + int64_t(kThreads) * VEC - 1) / (int64_t(kThreads) * VEC);
      TORCH_CHECK(tiles <= 65535, "logprobs backward: V = ", V, " is too wide for one launch");
      const dim3 grid(N, tiles);
      auto args = std::make_tuple(logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                                  g.data_ptr<acc_t>(), has_ge ? ge.data_ptr<acc_t>() : nullptr, ls.data_ptr<acc_t>(),
                                  has_ge ? h.data_ptr<acc_t>() : nullptr, V, logits.stride(0), out.stride(0), it,
                                  ignore_index);
      if (has_ge) {
        std::apply([&](auto... a) { logprobs_bwd_kernel<scalar_t, VEC, true><<<grid, kThreads, 0, stream>>>(a...); }, args);
      } else {
        std::apply([&](auto... a) { logprobs_bwd_kernel<scalar_t, VEC, false><<<grid, kThreads, 0, stream>>>(a...); }, args);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (aligned16(logits.data_ptr<scalar_t>(), logits.stride(0)) && aligned16(out.data_ptr<scalar_t>(), out.stride(0))) {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits_in, const at::Tensor& targets, const at::Tensor& lse,
                             const c10::optional<at::Tensor>& entropy, double inv_temperature, int64_t ignore_index) {
  const auto logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  auto out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  logprobs_bwd_into_cuda(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index, out);
  return out;
}

void logprobs_bwd_inplace_cuda(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                               at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                               const c10::optional<at::Tensor>& entropy, double inv_temperature, int64_t ignore_index) {
  logprobs_bwd_into_cuda(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index, logits);
}

// ---- latent Gaussian log-prob ----

template <typename scalar_t, int BLOCK>
__global__ void gaussian_fwd_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ z, int64_t D,
                                    at::opmath_type<scalar_t> c, at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < D; j += BLOCK) {
    const acc_t d = static_cast<acc_t>(z[row * D + j]) - static_cast<acc_t>(mu[row * D + j]);
    s += d * d;
  }
  __shared__ acc_t red[BLOCK / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t t = 0;
    for (int w = 0; w < BLOCK / 32; ++w) t += red[w];  // fixed order: deterministic
    out[row] = -t * c;
  }
}

template <typename scalar_t>
__global__ void gaussian_bwd_kernel(const at::opmath_type<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ mu,
                                    const scalar_t* __restrict__ z, int64_t D, int64_t total,
                                    at::opmath_type<scalar_t> c2, scalar_t* dmu, scalar_t* dz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  // d/dmu of -c (z - mu)^2 = 2c (z - mu); d/dz is its negative.
  const acc_t d = c2 * grad[i / D] * (static_cast<acc_t>(z[i]) - static_cast<acc_t>(mu[i]));
  if (dmu) dmu[i] = static_cast<scalar_t>(d);
  if (dz) dz[i] = static_cast<scalar_t>(-d);
}

at::Tensor gaussian_logprob_fwd_cuda(const at::Tensor& mu_in, const at::Tensor& z_in, double inv_two_sigma_sq) {
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const auto mu = mu_in.contiguous(), z = z_in.contiguous();
  const int64_t M = mu.size(0), D = mu.size(1);
  auto out = at::empty({M}, mu.options().dtype(mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (M == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gaussian_fwd_kernel<scalar_t, 256><<<M, 256, 0, stream>>>(mu.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), D,
                                                              static_cast<acc_t>(inv_two_sigma_sq),
                                                              out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_logprob_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& mu_in,
                                                             const at::Tensor& z_in, double inv_two_sigma_sq,
                                                             bool need_mu, bool need_z) {
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const auto mu = mu_in.contiguous(), z = z_in.contiguous();
  const auto grad = grad_in.to(mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  auto dmu = need_mu ? at::empty_like(mu) : at::empty({0}, mu.options());
  auto dz = need_z ? at::empty_like(z) : at::empty({0}, z.options());
  const int64_t total = mu.numel();
  if (total == 0 || (!need_mu && !need_z)) return {dmu, dz};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t blocks = (total + 255) / 256;
    gaussian_bwd_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
        grad.data_ptr<acc_t>(), mu.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), mu.size(1), total,
        static_cast<acc_t>(2 * inv_two_sigma_sq), need_mu ? dmu.data_ptr<scalar_t>() : nullptr,
        need_z ? dz.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dmu, dz};
}

}  // namespace

TORCH_LIBRARY_IMPL(medlvr, CUDA, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &logprobs_bwd_cuda);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cuda);
  m.impl("gaussian_logprob_fwd", &gaussian_logprob_fwd_cuda);
  m.impl("gaussian_logprob_bwd", &gaussian_logprob_bwd_cuda);
}

}  // namespace medlvr
