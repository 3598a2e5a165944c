// CPU kernels of gather_logprobs and latent_gaussian_logprob.
//
// One row of logits is processed in L1-sized chunks: a chunk is read from memory once
// (converted to fp32 if needed), its max taken, the running (max, sum) rescaled (online
// logsumexp), and exp summed from L1. So the row streams through memory once in the
// forward and once (read + write) in the backward, and nothing of size [N, V] besides
// the gradient is ever allocated. The hot loops are plain float loops that GCC
// auto-vectorises; target_clones builds an AVX2+FMA copy next to the baseline one and
// picks at load time, so one wheel serves every x86-64 CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "fast_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEDLVR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEDLVR_CLONES
#endif

namespace medlvr {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of fp32: stays in L1 between the passes over it
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

MEDLVR_CLONES float chunk_max(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// s += sum_j exp(y_j - m) and, with entropy, t += sum_j exp(y_j - m) (y_j - m), y = x * inv_t.
// t is kept relative to the running max: the dominant terms then have y - m ~ 0, and
// H = log s - t / s does not cancel two numbers of the size of the logits.
// exp(-inf) = 0 must not turn 0 * (y - m) = 0 * -inf into NaN, hence the select on e > 0.
MEDLVR_CLONES void chunk_sumexp(const float* x, int64_t n, float inv_t, float m, bool with_t,
                                float* s_out, float* t_out) {
  float s = 0.f, t = 0.f;
  if (with_t) {
#pragma omp simd reduction(+ : s, t)
    for (int64_t j = 0; j < n; ++j) {
      float d = x[j] * inv_t - m;
      float e = exp_nonpos(d);
      s += e;
      t += e > 0.f ? e * d : 0.f;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += exp_nonpos(x[j] * inv_t - m);
  }
  *s_out = s;
  *t_out = t;
}

// d_j = inv_t * (g (1[j == tgt] - p_j) - ge p_j (log p_j + H)), p_j = exp(y_j - lse).
// The entropy term: dH/dy_j = -p_j (log p_j + H).
MEDLVR_CLONES void chunk_grad(const float* x, int64_t n, float inv_t, float lse, float g, float ge,
                              float h, int64_t tgt, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float lp = x[j] * inv_t - lse;
    float p = exp_nonpos(lp);
    float d = (j == tgt ? g : 0.f) - g * p;
    d -= p > 0.f ? ge * p * (lp + h) : 0.f;
    out[j] = d * inv_t;
  }
}

template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

struct RowStats {
  float lse;
  float entropy;
};

template <typename T>
RowStats row_forward(const T* row, int64_t V, float inv_t, bool with_entropy) {
  float buf[kChunk];
  // Running totals in double: one add per chunk, so the cost is nil and the row sum
  // carries no more error than one chunk's fp32 sum.
  float m = kNegInf;
  double s = 0, t = 0;
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t n = std::min(kChunk, V - off);
    const float* x = as_float(row + off, n, buf);
    const float cm = chunk_max(x, n) * inv_t;  // inv_t > 0, so max commutes with the scale
    if (cm > m) {
      // Re-base the totals on the new max: s' = f s, t' = f (t + (m - cm) s), f = e^(m - cm).
      // Nothing was summed while m = -inf.
      if (m != kNegInf) {
        const double f = std::exp(static_cast<double>(m) - cm);
        t = f * (t + (static_cast<double>(m) - cm) * s);
        s *= f;
      }
      m = cm;
    }
    if (m == kNegInf) continue;
    float cs, ct;
    chunk_sumexp(x, n, inv_t, m, with_entropy, &cs, &ct);
    s += cs;
    t += ct;
  }
  const double log_s = std::log(s);
  // H = -sum p log p = -sum p (y - m - log s) = log s - t / s.
  return {static_cast<float>(m + log_s), with_entropy ? static_cast<float>(log_s - t / s) : 0.f};
}

template <typename T>
void row_backward(const T* row, T* out, int64_t V, float inv_t, float lse, float g, float ge, float h,
                  int64_t tgt) {
  float buf[kChunk];
  float dbuf[kChunk];
  for (int64_t off = 0; off < V; off += kChunk) {
    const int64_t n = std::min(kChunk, V - off);
    const float* x = as_float(row + off, n, buf);
    if constexpr (std::is_same_v<T, float>) {
      chunk_grad(x, n, inv_t, lse, g, ge, h, tgt - off, out + off);  // out may alias row: elementwise
    } else {
      chunk_grad(x, n, inv_t, lse, g, ge, h, tgt - off, dbuf);
      for (int64_t j = 0; j < n; ++j) out[off + j] = static_cast<T>(dbuf[j]);
    }
  }
}

// fp64 (used by gradcheck) runs plain double loops: exact beats fast there.
// The double overloads keep lse/H as double-precision values carried in a double tensor.
template <typename T>
void row_backward_f64(const T* row, T* out, int64_t V, double inv_t, double lse, double g,
                      double ge, double h, int64_t tgt) {
  for (int64_t j = 0; j < V; ++j) {
    const double lp = row[j] * inv_t - lse;
    const double p = std::exp(lp);
    double d = (j == tgt ? g : 0.0) - g * p;
    if (p > 0) d -= ge * p * (lp + h);
    out[j] = d * inv_t;
  }
}

template <typename T>
double row_lse_f64(const T* row, int64_t V, double inv_t, bool with_entropy, double* entropy) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) m = std::max(m, row[j] * inv_t);
  double s = 0, t = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double d = row[j] * inv_t - m;
    const double e = std::exp(d);
    s += e;
    if (e > 0) t += e * d;
  }
  if (with_entropy) *entropy = std::log(s) - t / s;
  return m + std::log(s);
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits_in,
                                                                 const at::Tensor& targets_in,
                                                                 double inv_temperature,
                                                                 int64_t ignore_index, bool with_entropy) {
  TORCH_CHECK(logits_in.dim() == 2, "logits must be 2-D");
  const auto logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  const auto targets = targets_in.to(at::kLong).contiguous();
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  // lse/entropy follow the input for fp64 (gradcheck) and are fp32 otherwise.
  const auto stat_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto logp = at::zeros({N}, logits.options().dtype(stat_dtype));
  auto lse = at::zeros({N}, logits.options().dtype(stat_dtype));
  auto entropy = at::zeros({with_entropy ? N : 0}, logits.options().dtype(stat_dtype));
  const int64_t* tg = targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, double>) {
      double* lp = logp.data_ptr<double>();
      double* ls = lse.data_ptr<double>();
      double* en = with_entropy ? entropy.data_ptr<double>() : nullptr;
      at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          if (tg[i] == ignore_index) continue;
          double h = 0;
          const double l = row_lse_f64(base + i * ld, V, inv_temperature, with_entropy, &h);
          ls[i] = l;
          lp[i] = base[i * ld + tg[i]] * inv_temperature - l;
          if (en) en[i] = h;
        }
      });
    } else {
      float* lp = logp.data_ptr<float>();
      float* ls = lse.data_ptr<float>();
      float* en = with_entropy ? entropy.data_ptr<float>() : nullptr;
      const float it = static_cast<float>(inv_temperature);
      at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          if (tg[i] == ignore_index) continue;
          const scalar_t* row = base + i * ld;
          const RowStats st = row_forward(row, V, it, with_entropy);
          ls[i] = st.lse;
          lp[i] = static_cast<float>(row[tg[i]]) * it - st.lse;
          if (en) en[i] = st.entropy;
        }
      });
    }
  });
  return {logp, lse, entropy};  // fp64 stays fp64 (gradcheck); everything else is fp32
}

void logprobs_bwd_into(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                       const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& lse,
                       const c10::optional<at::Tensor>& entropy, double inv_temperature, int64_t ignore_index,
                       at::Tensor& out) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t ld_in = logits.stride(0), ld_out = out.stride(0);
  TORCH_CHECK(logits.stride(1) == 1 && out.stride(1) == 1, "logits rows must be contiguous");
  const auto targets = targets_in.to(at::kLong).contiguous();
  const bool has_ge = grad_entropy.has_value() && grad_entropy->defined() && grad_entropy->numel() > 0;
  TORCH_CHECK(!has_ge || (entropy.has_value() && entropy->numel() == N),
              "an entropy gradient needs the forward's entropy");
  const auto stat_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto g = grad_logp.to(stat_dtype).contiguous();
  const auto ge = has_ge ? grad_entropy->to(stat_dtype).contiguous() : at::Tensor();
  const auto h = has_ge ? entropy->to(stat_dtype).contiguous() : at::Tensor();
  const auto ls = lse.to(stat_dtype).contiguous();
  const int64_t* tg = targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* in = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    const acc_t* gep = has_ge ? ge.data_ptr<acc_t>() : nullptr;
    const acc_t* hp = has_ge ? h.data_ptr<acc_t>() : nullptr;
    const acc_t* lp = ls.data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* orow = o + i * ld_out;
        if (tg[i] == ignore_index) {
          std::fill(orow, orow + V, static_cast<scalar_t>(0));
          continue;
        }
        const acc_t gi = gp[i], gei = gep ? gep[i] : acc_t(0), hi = hp ? hp[i] : acc_t(0);
        if constexpr (std::is_same_v<scalar_t, double>) {
          row_backward_f64(in + i * ld_in, orow, V, inv_temperature, lp[i], gi, gei, hi, tg[i]);
        } else {
          row_backward(in + i * ld_in, orow, V, static_cast<float>(inv_temperature), lp[i], gi, gei, hi, tg[i]);
        }
      }
    });
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits_in, const at::Tensor& targets, const at::Tensor& lse,
                            const c10::optional<at::Tensor>& entropy, double inv_temperature,
                            int64_t ignore_index) {
  const auto logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  auto out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  logprobs_bwd_into(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index, out);
  return out;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                              at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              const c10::optional<at::Tensor>& entropy, double inv_temperature,
                              int64_t ignore_index) {
  TORCH_CHECK(logits.stride(1) == 1, "in-place backward needs logits rows contiguous");
  logprobs_bwd_into(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index, logits);
}

// ---- latent Gaussian log-prob: -||z - mu||^2 / (2 sigma^2) per row, fp32 accumulation ----

template <typename T, typename acc_t>
acc_t sq_dist(const T* a, const T* b, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < D; ++j) {
    const acc_t d = static_cast<acc_t>(b[j]) - static_cast<acc_t>(a[j]);
    s += d * d;
  }
  return s;
}

at::Tensor gaussian_logprob_fwd_cpu(const at::Tensor& mu_in, const at::Tensor& z_in, double inv_two_sigma_sq) {
  const auto mu = mu_in.contiguous(), z = z_in.contiguous();
  const int64_t M = mu.size(0), D = mu.size(1);
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({M}, mu.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_logprob_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* x = z.data_ptr<scalar_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t s = sq_dist<scalar_t, acc_t>(m + i * D, x + i * D, D);
        o[i] = -s * static_cast<acc_t>(inv_two_sigma_sq);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_logprob_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& mu_in,
                                                            const at::Tensor& z_in, double inv_two_sigma_sq,
                                                            bool need_mu, bool need_z) {
  const auto mu = mu_in.contiguous(), z = z_in.contiguous();
  const int64_t M = mu.size(0), D = mu.size(1);
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto grad = grad_in.to(acc).contiguous();
  auto dmu = need_mu ? at::empty_like(mu) : at::empty({0}, mu.options());
  auto dz = need_z ? at::empty_like(z) : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_logprob_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* x = z.data_ptr<scalar_t>();
    const acc_t* g = grad.data_ptr<acc_t>();
    scalar_t* dm = need_mu ? dmu.data_ptr<scalar_t>() : nullptr;
    scalar_t* dx = need_z ? dz.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        // d/dmu of -(z-mu)^2 c = 2c (z - mu); d/dz is its negative.
        const acc_t k = 2 * static_cast<acc_t>(inv_two_sigma_sq) * g[i];
        for (int64_t j = 0; j < D; ++j) {
          const acc_t d = k * (static_cast<acc_t>(x[i * D + j]) - static_cast<acc_t>(m[i * D + j]));
          if (dm) dm[i * D + j] = static_cast<scalar_t>(d);
          if (dx) dx[i * D + j] = static_cast<scalar_t>(-d);
        }
      }
    });
  });
  return {dmu, dz};
}

}  // namespace

TORCH_LIBRARY_IMPL(medlvr, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cpu);
  m.impl("gaussian_logprob_fwd", &gaussian_logprob_fwd_cpu);
  m.impl("gaussian_logprob_bwd", &gaussian_logprob_bwd_cpu);
}

}  // namespace medlvr
