// Schemas of every medlvr op (torch.ops.medlvr.*) and the Python module medlvr._C.
// Kernels register per backend in their own files (TORCH_LIBRARY_IMPL); the fake/meta
// kernels that let torch.compile trace these ops live in medlvr/ops/logprobs.py (_register_fakes).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(medlvr, m) {
  // Row-wise log_softmax(logits / T)[target] with an online logsumexp (one pass over V).
  // Returns (logp[N], lse[N], entropy[N] or [0] when not requested), fp32 (fp64 for fp64 logits).
  m.def("logprobs_fwd(Tensor logits, Tensor targets, float inv_temperature, int ignore_index, "
        "bool with_entropy) -> (Tensor, Tensor, Tensor)");
  // d logits = (g_logp (onehot - p) - g_ent p (log p + H)) / T, into a new tensor.
  m.def("logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor targets, "
        "Tensor lse, Tensor? entropy, float inv_temperature, int ignore_index) -> Tensor");
  // The same gradient written over the logits buffer (no second [N, V] tensor).
  m.def("logprobs_bwd_(Tensor grad_logp, Tensor? grad_entropy, Tensor(a!) logits, Tensor targets, "
        "Tensor lse, Tensor? entropy, float inv_temperature, int ignore_index) -> ()");
  // -||z - mu||^2 * inv_two_sigma_sq summed over D, fp32 [M] (fp64 for fp64 inputs).
  m.def("gaussian_logprob_fwd(Tensor mu, Tensor z, float inv_two_sigma_sq) -> Tensor");
  // (d mu, d z) for an upstream grad[M]; an empty tensor where not needed.
  m.def("gaussian_logprob_bwd(Tensor grad, Tensor mu, Tensor z, float inv_two_sigma_sq, "
        "bool need_mu, bool need_z) -> (Tensor, Tensor)");
}

static bool built_with_cuda() {
#ifdef MEDLVR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#define MEDLVR_STR2(x) #x
#define MEDLVR_STR(x) MEDLVR_STR2(x)

static std::string cuda_archs() {
#ifdef MEDLVR_CUDA_ARCHS
  return MEDLVR_STR(MEDLVR_CUDA_ARCHS);  // e.g. sm80_90: TORCH_CUDA_ARCH_LIST as one token
#else
  return "";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "medlvr compiled kernels; importing registers torch.ops.medlvr.*";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for");
}
